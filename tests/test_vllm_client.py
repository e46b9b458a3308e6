"""
tools/vllm_embed.py and bench/vllm_parity.py without vLLM or a GPU: vLLM is stood in for by
small fakes (a module named vllm with LLM, PoolingParams and vllm.config.PoolerConfig), so
what is checked is the client's side: the installed release against MIN_VLLM, vLLM's own
config types passed at load, the request (token_embed, use_activation=False), the pooling
of the side's tokens, the input checks (refused before anything reaches vLLM, named by
index), and the bench's one process per route. That the vectors equal ReMatch.embed is
tests/test_st_export.py's (vLLM stood in for by transformers) and, on a GPU,
bench/vllm_parity.py's.

    pytest tests/test_vllm_client.py
"""
import json
import os
import pathlib
import sys
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import shape_image

from tools import vllm_embed

SIDE_IDS = {"query": [90, 91], "document": [92, 93]}        # K = 2 per side


@dataclass
class FakePoolerConfig:
    task: str = None
    use_activation: bool = None


class FakeLLM:
    """LLM(...) and LLM.encode as vLLM answers token_embed: per prompt its token ids (here
    7 prompt tokens, then the side's K ids read from the rendered prompt) and one state
    per token."""
    made = []

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []
        FakeLLM.made.append(self)

    def encode(self, prompts, pooling_task=None, pooling_params=None, use_tqdm=True):
        self.calls.append((prompts, pooling_task, pooling_params))
        out = []
        for n, p in enumerate(prompts):
            side = p["prompt"].rsplit("|", 1)[1]
            ids = list(range(7)) + SIDE_IDS[side]
            states = torch.randn(len(ids), 8, generator=torch.Generator().manual_seed(n))
            out.append(SimpleNamespace(prompt_token_ids=ids, outputs=SimpleNamespace(data=states)))
        return out


class FakeTokenizer:
    def apply_chat_template(self, messages, tokenize=False, task=None):
        kinds = "+".join(c["type"] for c in messages[0]["content"])
        return f"{kinds}|{task}"

    def convert_tokens_to_ids(self, tokens):
        return [int(t.split("_")[-1]) for t in tokens]


@pytest.fixture()
def fake_vllm(monkeypatch):
    """A stand-in vllm (release 0.21.0 by its distribution's metadata); returns the module."""
    import importlib.metadata
    vllm = ModuleType("vllm")
    vllm.LLM = FakeLLM
    vllm.PoolingParams = lambda **kw: SimpleNamespace(**kw)
    config = ModuleType("vllm.config")
    config.PoolerConfig = FakePoolerConfig
    for name, module in (("vllm", vllm), ("vllm.config", config)):
        monkeypatch.setitem(sys.modules, name, module)
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda d: "0.21.0" if d == "vllm" else real(d))
    FakeLLM.made.clear()
    return vllm


@pytest.fixture()
def client(fake_vllm, tmp_path, monkeypatch):
    """ReMatchVLLM over FakeLLM, with an export folder's rematch_pooling.json and a fake
    tokenizer (the prompt is the content kinds and the side)."""
    import transformers
    spec = {f"{side}_tokens": [f"<|rematch_{side[0]}_{i}|>_{i}" for i in ids] for side, ids in SIDE_IDS.items()}
    (tmp_path / "rematch_pooling.json").write_text(json.dumps(spec))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda path: FakeTokenizer())
    return vllm_embed.ReMatchVLLM(vllm_embed.load_llm(str(tmp_path), dtype="bfloat16"), str(tmp_path))


# ----------------------------------------------------------------------------------
# The installed vLLM against the minimum release, vLLM's own types

def test_release_numbers():
    assert vllm_embed.release("0.21.0") == (0, 21, 0)
    assert vllm_embed.release("0.21.1rc1.dev3+g12ab") == (0, 21, 1)
    assert vllm_embed.release("v0.22") == (0, 22, 0)
    assert vllm_embed.release("1.0") == (1, 0, 0)
    assert vllm_embed.release("0.1.dev12072+g58d5b3f51") == (0, 1, 0)
    with pytest.raises(vllm_embed.VLLMVersionError, match="cannot read a release number"):
        vllm_embed.release("unknown")


@pytest.mark.parametrize("found", ["0.20.2", "0.15.0", "0.1.dev12072+g58d5b3f51"])
def test_an_older_vllm_is_refused_naming_both_releases_before_anything_loads(fake_vllm, monkeypatch, found):
    import importlib.metadata
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda d: found if d == "vllm" else real(d))
    need = "\\.".join(map(str, vllm_embed.MIN_VLLM))
    for call in (lambda: vllm_embed.load_llm("export"), lambda: vllm_embed.ReMatchVLLM(None, "export")):
        with pytest.raises(vllm_embed.VLLMVersionError,
                           match=rf"vLLM {found.replace('+', '.')} is installed; .* needs vLLM >= {need}: "
                                 r".*PoolerConfig\(task='token_embed'\).*use_activation=False"):
            call()
    assert FakeLLM.made == []                                   # refused before vLLM was asked


def test_where_the_version_comes_from(fake_vllm, monkeypatch):
    """The distribution's metadata; without it the module's __version__; without either a
    named error; without vllm an ImportError naming the release to install."""
    import importlib.metadata
    real = importlib.metadata.version

    def absent(name):
        if name == "vllm":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)
    assert vllm_embed.check_vllm() == "0.21.0"
    monkeypatch.setattr(importlib.metadata, "version", absent)
    with pytest.raises(vllm_embed.VLLMVersionError, match="has no version"):
        vllm_embed.check_vllm()
    fake_vllm.__version__ = "0.23.1"
    assert vllm_embed.check_vllm() == "0.23.1"
    monkeypatch.setitem(sys.modules, "vllm", None)                        # import vllm fails
    with pytest.raises(ImportError, match=r"vllm is not installed: pip install 'vllm>=0.21.0'"):
        vllm_embed.check_vllm()


def test_load_llm_passes_vllms_own_pooler_config(fake_vllm, monkeypatch):
    """runner="pooling", pooler_config=vLLM's PoolerConfig(task="token_embed",
    use_activation=False), engine arguments as given; PoolerConfig is also found where
    its module moved (vllm.config.pooler)."""
    llm = vllm_embed.load_llm("runs/x/merged", dtype="bfloat16", max_model_len=4096)
    assert llm.kwargs == {"model": "runs/x/merged", "runner": "pooling", "dtype": "bfloat16", "max_model_len": 4096,
                          "pooler_config": FakePoolerConfig(task="token_embed", use_activation=False)}
    moved = ModuleType("vllm.config.pooler")
    moved.PoolerConfig = FakePoolerConfig
    monkeypatch.setitem(sys.modules, "vllm.config", ModuleType("vllm.config"))
    monkeypatch.setitem(sys.modules, "vllm.config.pooler", moved)
    assert vllm_embed.pooler_config() == FakePoolerConfig(task="token_embed", use_activation=False)


# ----------------------------------------------------------------------------------
# The request and the pooling

def test_embed_asks_for_unnormalised_token_states_and_pools_the_side_tokens(client, tmp_path):
    """One llm.encode call: pooling_task "token_embed", PoolingParams(use_activation=False),
    the image in multi_modal_data (a path opened as RGB); each vector is the normalised
    mean of the last K states, whose ids are the side's."""
    path = tmp_path / "red.png"
    shape_image("red", 40).convert("P").save(path)
    inputs = ["a red circle", ("<|image_1|>\nRepresent the given image.", shape_image("blue")),
              (None, str(path)), pathlib.Path(path)]
    for side in ("query", "document"):
        E = client.embed(inputs, side)
        prompts, task, params = client.llm.calls[-1]
        assert task == "token_embed" and params.use_activation is False and set(vars(params)) == {"use_activation"}
        kinds = ["text", "image+text", "image", "image"]
        assert [p["prompt"] for p in prompts] == [f"{k}|{side}" for k in kinds]
        assert all(p["multi_modal_data"]["image"].mode == "RGB" for p in prompts[2:])
        states = [torch.randn(9, 8, generator=torch.Generator().manual_seed(n)) for n in range(4)]
        want = torch.stack([F.normalize(h[-2:].mean(0), dim=-1) for h in states])
        torch.testing.assert_close(E, want, rtol=0, atol=1e-6)


BLUE = shape_image("blue")
REFUSED = [
    ("a text", "query", TypeError, r"embed: inputs must be a list, got str \(for one input, pass \[input\]\)"),
    (("a text", BLUE), "query", TypeError, r"inputs must be a list, got tuple \(for one input"),
    ([], "query", ValueError, r"embed: no inputs \(an empty list\)"),
    (["a text"], "q", ValueError, r"side must be 'query' or 'document', got 'q'"),
    (["ok", "  "], "query", ValueError, r"embed: inputs\[1\]: empty text and no image"),
    (["ok", (None, None)], "document", ValueError, r"inputs\[1\]: empty text and no image"),
    (["ok", ("a", BLUE, "b")], "query", TypeError, r"inputs\[1\]: a pair must be \(text, image\), got a tuple of 3"),
    ([(BLUE, "a caption")], "query", TypeError, r"inputs\[0\]: a pair is \(text, image\) here, got \(image, text\)"),
    (["ok", ("a", torch.zeros(3, 8, 8))], "query", TypeError,
     r"inputs\[1\]: the image must be a PIL image or a path, got Tensor"),
    (["ok", 7], "query", TypeError,
     r"inputs\[1\]: expected a text \(str\), an image or a \(text, image\) pair, got int"),
    ([(b"bytes", BLUE)], "query", TypeError, r"inputs\[0\]: the text must be a str"),
    (["ok", "<|image_1|>\nRepresent the given image."], "document", ValueError,
     r"inputs\[1\]: the text has <\|image_1\|> but no image was given"),
    ([("<|image_1|> and <|image_1|>", BLUE)], "query", ValueError, r"inputs\[0\]: the text has <\|image_1\|> 2 times"),
    ([("<|vision_start|><|image_pad|><|vision_end|> what is it?", BLUE)], "query", ValueError,
     r"inputs\[0\]: the text holds <\|image_pad\|> itself"),
]


@pytest.mark.parametrize("inputs, side, error, match", REFUSED)
def test_embed_refuses_what_encoder_refuses_naming_the_input_before_vllm_is_asked(client, inputs, side, error, match):
    with pytest.raises(error, match=match):
        client.embed(inputs, side)
    assert client.llm.calls == []


def test_a_missing_image_file_is_named(client, tmp_path):
    with pytest.raises(FileNotFoundError):
        client.embed([("<|image_1|>", str(tmp_path / "absent.png"))], "document")
    assert client.llm.calls == []


# ----------------------------------------------------------------------------------
# bench/vllm_parity.py: one process per route, compared in the parent

def test_the_parity_bench_runs_each_route_in_its_own_process(tmp_path, capsys):
    """--dry_run: the reference, exact and default routes each run as a child process of
    their own (three pids, none this one), one after the other, each writing its vectors;
    the parent reads them and prints the table side by side (stand-in vectors: the exact
    route equal to the reference, the default not)."""
    from bench import vllm_parity
    rows, results = vllm_parity.main(["--dry_run", "--work", str(tmp_path)])
    pids = {int(results[r]["pid"]) for r in vllm_parity.ROUTES}
    assert len(pids) == 3 and os.getpid() not in pids
    assert sorted(os.listdir(tmp_path)) == [f"route-{r}.npz" for r in sorted(vllm_parity.ROUTES)]
    assert [name for name, *_ in rows] == ["exact route (query)", "exact route (document)",
                                           "vLLM default LAST (query)", "vLLM default LAST (document)"]
    assert all(diff == 0 and cos == pytest.approx(1) for _, diff, cos in rows[:2])
    assert all(diff > 0.1 and cos < 0.9 for _, diff, cos in rows[2:])
    printed = capsys.readouterr().out
    assert "one process per route (pid reference" in printed
    assert "dry run: stand-in vectors, nothing measured" in printed


def test_a_failing_route_is_named(tmp_path, monkeypatch):
    from bench import vllm_parity
    monkeypatch.setattr(vllm_parity, "ROUTES", ("reference", "nonexistent"))
    with pytest.raises(vllm_parity.RouteError, match="route nonexistent failed .*run it alone"):
        vllm_parity.main(["--dry_run", "--work", str(tmp_path)])
