"""
The merged export (tools/export_merged.py): a standard Qwen2-VL checkpoint directory with the
LoRA merged and the learnable tokens as special tokens. Oracle: ReMatch.embed on the training
checkpoint. The plain-transformers script (tools/plain_embed.py) is copied alone to another
directory and run there in a subprocess without PYTHONPATH: it can import nothing from this
repository. The written dtype: bf16 by default, float16 / float32 on request (the fp32 export
is the one held to the oracle; tests/test_st_export.py holds the bf16 one to it).

    pytest tests/test_export.py
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import shape_image
from test_train import flags, write_train_fixture

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUTS = [("query", "a red circle", None),                                   # text
          ("document", "<|image_1|>\nRepresent the given image.", "blue.png"),   # image
          ("query", "<|image_1|>\nWhat colour is the circle? Answer in one word.", "red.png"),  # image + text
          ("document", "Represent the class label: a green square", None),
          ("document", "a red circle", None)]                                  # input 0, other side


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    return write_train_fixture(str(tmp_path_factory.mktemp("export_train")), n=6)


@pytest.mark.parametrize("extra", [[], ["--lora", "--lora_r", "4", "--lora_alpha", "8"],
                                   ["--model", "tiny-qwen3-vl", "--lora", "--lora_r", "4",
                                    "--lora_alpha", "8"]],
                         ids=["full", "lora", "qwen3-vl-lora"])   # Qwen3-VL: DeepStack in both
def test_plain_transformers_reproduces_the_embeddings(fixture_dir, tmp_path, extra):
    import train
    from data import collate_embed, encode_item
    from model import load_rematch
    from tools.export_merged import export_merged

    out = str(tmp_path / "run")
    train.main(flags(fixture_dir, out, "--steps", "2", "--num_tokens", "3", *extra))
    ckpt, merged = os.path.join(out, "checkpoint-2"), str(tmp_path / "merged")
    spec = export_merged(ckpt, merged, dtype=torch.float32)          # the oracle's precision
    assert spec["num_tokens"] == 3 and spec["query_tokens"][0] == "<|rematch_q_0|>"

    shape_image("blue", 84, "square").save(tmp_path / "blue.png")
    shape_image("red", (56, 112)).save(tmp_path / "red.png")
    rows = [{"text": t, "image": str(tmp_path / im) if im else None, "side": s} for s, t, im in INPUTS]
    (tmp_path / "inputs.json").write_text(json.dumps(rows))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    work = tmp_path / "elsewhere"                   # the script alone, run from there:
    work.mkdir()                                    # nothing of the repository on sys.path
    shutil.copy(os.path.join(REPO, "tools", "plain_embed.py"), work)
    subprocess.run([sys.executable, "plain_embed.py", merged, str(tmp_path / "inputs.json"),
                    str(tmp_path / "E.pt")], cwd=work, env=env, check=True, capture_output=True)
    plain = torch.load(tmp_path / "E.pt", weights_only=True)                     # (N, d)

    model, processor, _ = load_rematch(ckpt, device="cpu")
    from PIL import Image
    for n, (side, text, im) in enumerate(INPUTS):
        image = Image.open(tmp_path / im).convert("RGB") if im else None
        batch = collate_embed([encode_item(processor, text, image)], processor.tokenizer, 3,
                              model.embed_template)
        with torch.no_grad():
            E, _ = model.embed(batch, "q" if side == "query" else "d")
        torch.testing.assert_close(plain[n], F.normalize(E[0], dim=-1), rtol=0, atol=1e-5,
                                   msg=lambda m: f"{side} {text!r}: {m}")
    # queries and documents use different tokens: the same input differs by side
    assert (plain[0] - plain[4]).abs().max() > 1e-3


def test_export_refuses_a_non_empty_directory(tmp_path, capsys):
    from tools.export_merged import main
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("")
    with pytest.raises(SystemExit):
        main(["ckpt", str(tmp_path / "x")])
    assert "exists and is not empty" in capsys.readouterr().err


def _dtypes_on_disk(folder):
    """The safetensors dtypes of the backbone's weight files in an export folder."""
    from safetensors import safe_open
    found = set()
    for name in os.listdir(folder):
        if name.startswith("model") and name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                found |= {f.get_slice(k).get_dtype() for k in f.keys()}
    return found


def test_export_writes_bf16_by_default_and_other_dtypes_on_request(fixture_dir, tmp_path):
    """tools/export_merged.py without --dtype writes bf16 weights (every tensor), and says so in
    rematch_pooling.json and config.json; --dtype float16 / float32 write those; another dtype
    is refused, by the CLI and by export_merged."""
    import train
    from tools.export_merged import export_merged, main
    out = str(tmp_path / "run")
    train.main(flags(fixture_dir, out, "--steps", "1", "--num_tokens", "2"))
    ckpt = os.path.join(out, "checkpoint-1")
    for flag, want, name in (([], "BF16", "bfloat16"), (["--dtype", "float16"], "F16", "float16"),
                             (["--dtype", "float32"], "F32", "float32")):
        merged = str(tmp_path / f"merged-{name}")
        main([ckpt, merged, *flag])
        assert _dtypes_on_disk(merged) == {want}, flag
        with open(os.path.join(merged, "rematch_pooling.json")) as f:
            assert json.load(f)["dtype"] == name
        with open(os.path.join(merged, "config.json")) as f:
            assert json.load(f).get("dtype") == name
    with pytest.raises(SystemExit):
        main([ckpt, str(tmp_path / "x"), "--dtype", "int8"])
    with pytest.raises(ValueError, match="dtype must be one of bfloat16, float16, float32"):
        export_merged(ckpt, str(tmp_path / "y"), dtype=torch.float64)
