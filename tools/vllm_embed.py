"""
ReMatch embeddings from vLLM, exactly, with a merged export (tools/export_merged.py). This
file imports nothing from the rematch repository: copy it next to your client.

vLLM has no pooling for "the mean of the last K tokens". Served with its defaults, a ReMatch
export returns the state of the LAST token only (the K-th learnable token), L2-normalised:
a vector that looks fine and is wrong. The exact route asks vLLM for every token's
final-norm state (pooling task "token_embed") without its per-token normalisation
(use_activation=False: the mean of normalised states is not the normalised mean), and
pools here: the last K states, after checking that they are the side's K tokens, mean,
L2-normalise. Cost: the prompt's tokens × width floats come back per input.

    from vllm_embed import ReMatchVLLM, load_llm
    llm = load_llm("runs/demo/merged", dtype="bfloat16")    # vllm.LLM, runner="pooling",
    rm = ReMatchVLLM(llm, "runs/demo/merged")               # PoolerConfig(task="token_embed", use_activation=False)
    E_q = rm.embed(["a dog on a beach"], side="query")                       # (1, d)
    E_d = rm.embed([("<|image_1|>\\nRepresent the given image.", pil_image)], side="document")

vLLM ≥ 0.21.0 (MIN_VLLM): from that release a pooling model has one task, chosen at load
(vLLM's PoolerConfig(task=...); "pooling multitask support has been removed in v0.21" in
vLLM's pooling docs), and token_embed takes use_activation. Older releases have no
PoolerConfig.task (0.15's has none) or take normalize= where use_activation goes; the
few between that may have both are not verified, so 0.21 is the floor. ReMatchVLLM and
load_llm check the installed release first and name both versions (VLLMVersionError).

An input is a text (the MMEB string, instruction included) or a (text, image) pair whose
text marks the image with <|image_1|> (without the mark the image goes first, as
Encoder.encode places it), or an image alone; an image is a PIL image or a path to one
(str or os.PathLike in a pair, os.PathLike alone: a str alone is a text). embed refuses what
Encoder.encode refuses, naming the input by its index: not a list, an empty list, another
side, an empty text without an image, a pair that is not (text, image), an image of another
type, <|image_1|> without an image or more than once, Qwen's raw vision tokens in a text.
bench/vllm_parity.py checks the vectors against ReMatch.embed on a GPU; tests/test_vllm_client.py
checks the client with vLLM stood in for.
"""
import json
import os
import re

import torch
import torch.nn.functional as F

MIN_VLLM = (0, 21, 0)
MIN_VLLM_WHY = ("the pooling task is set once, at load (PoolerConfig(task='token_embed'): pooling multitask "
                "was removed in vLLM 0.21), and token_embed is asked for unnormalised states "
                "(use_activation=False); older releases lack PoolerConfig.task or take normalize= instead")
IMAGE_MARK = "<|image_1|>"                           # MMEB's image placeholder in a text
RAW_VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
SIDES = ("query", "document")


class VLLMVersionError(RuntimeError):
    """The installed vLLM is older than MIN_VLLM, or its version cannot be read."""


def release(version):
    """The release numbers of a version string, three of them: "0.21.1rc1.dev3+g12ab" → (0,
    21, 1), "1.0" → (1, 0, 0). A pre-release or dev build counts as its release."""
    m = re.match(r"v?(\d+(?:\.\d+)*)", str(version).strip())
    if not m:
        raise VLLMVersionError(f"cannot read a release number from vLLM's version {version!r}")
    numbers = tuple(int(n) for n in m.group(1).split("."))
    return (numbers + (0, 0, 0))[:3]


def installed_vllm():
    """The installed vLLM's version: its distribution's (importlib.metadata), else the
    module's __version__ (a source tree on sys.path). ImportError without vLLM."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("vllm")
    except PackageNotFoundError:
        pass
    try:
        import vllm
    except ImportError:
        raise ImportError(f"vllm is not installed: pip install 'vllm>={'.'.join(map(str, MIN_VLLM))}'") from None
    found = getattr(vllm, "__version__", None)
    if found is None:
        raise VLLMVersionError(f"vllm imports from {getattr(vllm, '__file__', '?')} but has no version "
                               "(no distribution metadata, no __version__): install it with pip")
    return found


def check_vllm(found=None):
    """The installed vLLM's version (or `found`), checked against MIN_VLLM: an older one
    raises VLLMVersionError naming both releases and why."""
    found = found if found is not None else installed_vllm()
    need = ".".join(map(str, MIN_VLLM))
    if release(found) < MIN_VLLM:
        raise VLLMVersionError(f"vLLM {found} is installed; tools/vllm_embed.py needs vLLM >= {need}: "
                               f"{MIN_VLLM_WHY}. Upgrade: pip install -U 'vllm>={need}'")
    return found


def vllm_types():
    """vLLM's own (PoolerConfig, PoolingParams), after check_vllm. PoolerConfig is exported
    by vllm.config (its module moved to vllm/config/pooler.py; both are tried)."""
    check_vllm()
    from vllm import PoolingParams
    try:
        from vllm.config import PoolerConfig
    except ImportError:
        from vllm.config.pooler import PoolerConfig
    return PoolerConfig, PoolingParams


def pooler_config():
    """The exact route's pooler, as vLLM's PoolerConfig: task token_embed (every token's
    final-norm state), no per-token activation."""
    PoolerConfig, _ = vllm_types()
    return PoolerConfig(task="token_embed", use_activation=False)


def load_llm(export_dir, **engine_args):
    """vllm.LLM for the exact route on a merged export: runner="pooling" with pooler_config();
    engine_args (dtype, max_model_len, gpu_memory_utilization, ...) go to LLM as they are."""
    config = pooler_config()                         # checks the release before vLLM loads anything
    from vllm import LLM
    return LLM(model=export_dir, runner="pooling", pooler_config=config, **engine_args)


def render(tokenizer, text, image, side):
    """The prompt of one input through the export's own chat template (the embedding
    input: template, content with one <|image_pad|> per image, the side's K tokens)."""
    content = ([{"type": "image"}] if image is not None else []) + ([{"type": "text", "text": text}] if text else [])
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, task=side)


def pool(token_ids, states, side_ids):
    """The ReMatch embedding from one input's per-token states (T, d): the mean of the last
    K, L2-normalised, after checking that the last K token ids are the side's (K = 0: the
    last state). Raises on a mismatch rather than return another vector."""
    K = len(side_ids)
    if len(token_ids) != states.shape[0]:
        raise ValueError(f"vLLM returned {states.shape[0]} states for {len(token_ids)} tokens: "
                         "not per-token states (request pooling_task='token_embed')")
    if K and list(token_ids[-K:]) != list(side_ids):
        raise ValueError(f"the prompt ends with {list(token_ids[-K:])}, not the side's tokens "
                         f"{list(side_ids)}: it was truncated or rendered with another template")
    h = states[-max(K, 1):].float()                                      # (K, d)
    return F.normalize(h.mean(0), dim=-1)                                # (d,)


def _is_image(x):
    from PIL import Image
    return isinstance(x, Image.Image)


def check_inputs(inputs, side, where="embed"):
    """embed's arguments, checked as Encoder.encode checks its own, before anything is sent
    to vLLM → [(text or None, PIL image or None)]. Each refusal names the input by index:
    a list of inputs (not one str, pair or image), not empty; side "query" or "document";
    an input is a str, an image alone (PIL or os.PathLike) or a (text, image) pair, text a
    str or None, image a PIL image or a path (str or os.PathLike), a path opened here as
    RGB; a text empty without an image, a text
    with <|image_1|> but no image or with it more than once, or holding Qwen's raw vision
    tokens is refused."""
    if side not in SIDES:
        raise ValueError(f"{where}: side must be 'query' or 'document', got {side!r}")
    if not isinstance(inputs, list):
        one = isinstance(inputs, (str, tuple)) or _is_image(inputs)
        raise TypeError(f"{where}: inputs must be a list, got {type(inputs).__name__}"
                        + (" (for one input, pass [input])" if one else ""))
    if not inputs:
        raise ValueError(f"{where}: no inputs (an empty list)")
    rows = []
    for i, x in enumerate(inputs):
        at = f"{where}: inputs[{i}]"
        if isinstance(x, tuple):
            if len(x) != 2:
                raise TypeError(f"{at}: a pair must be (text, image), got a tuple of {len(x)}")
            text, image = x
            if isinstance(image, str) and (_is_image(text) or isinstance(text, os.PathLike)):
                raise TypeError(f"{at}: a pair is (text, image) here, got (image, text)")
        elif isinstance(x, str):
            text, image = x, None
        elif _is_image(x) or isinstance(x, os.PathLike):
            text, image = None, x
        else:
            raise TypeError(f"{at}: expected a text (str), an image or a (text, image) pair, "
                            f"got {type(x).__name__}")
        if text is not None and not isinstance(text, str):
            raise TypeError(f"{at}: the text must be a str (or None with an image), got {type(text).__name__}")
        if image is not None and not (_is_image(image) or isinstance(image, (str, os.PathLike))):
            raise TypeError(f"{at}: the image must be a PIL image or a path, got {type(image).__name__} "
                            "(convert arrays with PIL.Image.fromarray)")
        text = text or ""
        if image is None and not text.strip():
            raise ValueError(f"{at}: empty text and no image")
        marks = text.count(IMAGE_MARK)
        if image is None and marks:
            raise ValueError(f"{at}: the text has {IMAGE_MARK} but no image was given: {text[:80]!r}")
        if marks > 1:
            raise ValueError(f"{at}: the text has {IMAGE_MARK} {marks} times (one image per input): {text[:80]!r}")
        raw = [t for t in RAW_VISION_TOKENS if t in text]
        if raw:
            raise ValueError(f"{at}: the text holds {raw[0]} itself (mark the image with {IMAGE_MARK}): "
                             f"{text[:80]!r}")
        if isinstance(image, (str, os.PathLike)):
            from PIL import Image
            with Image.open(image) as im:
                image = im.convert("RGB")
        rows.append((text or None, image))
    return rows


class ReMatchVLLM:
    """A vLLM LLM (runner="pooling", PoolerConfig(task="token_embed", use_activation=False):
    load_llm builds one) + the export's tokenizer and pooling description
    (rematch_pooling.json). The installed vLLM is checked against MIN_VLLM first."""

    def __init__(self, llm, export_dir):
        from transformers import AutoTokenizer
        self.vllm_version = check_vllm()
        with open(os.path.join(export_dir, "rematch_pooling.json")) as f:
            self.spec = json.load(f)
        self.tokenizer = AutoTokenizer.from_pretrained(export_dir)
        self.llm = llm
        self.side_ids = {side: self.tokenizer.convert_tokens_to_ids(self.spec[f"{side}_tokens"]) for side in SIDES}

    def embed(self, inputs, side="query"):
        """inputs: a list of texts, images or (text, image) pairs (check_inputs) → (N, d)
        L2-normalised, fp32 on the CPU."""
        from vllm import PoolingParams
        prompts = []
        for text, image in check_inputs(inputs, side):
            p = {"prompt": render(self.tokenizer, text, image, side)}
            if image is not None:
                p["multi_modal_data"] = {"image": image}
            prompts.append(p)
        outs = self.llm.encode(prompts, pooling_task="token_embed",
                               pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
        return torch.stack([pool(o.prompt_token_ids, torch.as_tensor(o.outputs.data), self.side_ids[side])
                            for o in outs]).cpu()
