"""
vLLM against ReMatch.embed on a GPU: are the vectors vLLM serves the ReMatch embedding?

A merged export (tools/export_merged.py) of a checkpoint (--checkpoint; default: a
width-real Qwen2-VL-2B, K = 16, random weights, written offline) is served by vLLM two ways,
side by side on the same inputs (text, image, image + text; query and document side):

  - the exact route, tools/vllm_embed.py: pooling task token_embed, use_activation=False,
    the last K states pooled on the client;
  - vLLM's default embedding (LLM.embed: LAST pooling, normalised): the K-th learnable
    token's state alone, what `vllm serve` answers on /v1/embeddings for this folder.

Each is compared with ReMatch.embed under transformers on the same GPU and dtype: max |Δ|
and the lowest cosine over the inputs. The exact route should agree to the dtype's noise;
the default should not (that is the silent error the exact route avoids).

    pip install vllm     # not in requirements: GPU only, never in CI
    python bench/vllm_parity.py                        # width-real 2B, bf16
    python bench/vllm_parity.py --checkpoint runs/x/checkpoint-N --dtype float32

Exits 0 without CUDA or without vllm (prints why).
"""
import argparse
import os
import sys
import tempfile

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def inputs():
    """(text, image or None) of both kinds, MMEB-style strings."""
    from PIL import Image, ImageDraw
    ims = []
    for colour, size in (("red", (224, 224)), ("blue", (336, 224))):
        im = Image.new("RGB", size, "white")
        ImageDraw.Draw(im).ellipse((40, 40, size[0] - 40, size[1] - 40), fill=colour)
        ims.append(im)
    return [("Find an image of a red circle.", None),
            ("<|image_1|>\nRepresent the given image.", ims[0]),
            ("<|image_1|>\nWhat colour is the circle? Answer in one word.", ims[1]),
            ("Represent the class label: a blue circle", None)]


def reference(checkpoint, dtype, side, xs):
    """ReMatch.embed of xs under transformers, (N, d) fp32 normalised."""
    from data import collate_embed, encode_item
    from model import load_rematch
    model, processor, _ = load_rematch(checkpoint, device="cuda", dtype=dtype)
    out = []
    for text, image in xs:
        batch = collate_embed([encode_item(processor, text, image)], processor.tokenizer,
                              model.num_tokens, model.embed_template)
        with torch.no_grad():
            E, _ = model.embed(batch, side)
        out.append(F.normalize(E[0].float(), dim=-1).cpu())
    del model
    torch.cuda.empty_cache()
    return torch.stack(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="a train.py checkpoint (default: width-real 2B)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--work", default=None, help="where to write the checkpoint and export (default: temp)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured")
        return
    try:
        from vllm import LLM
    except ImportError:
        print("vllm is not installed (pip install vllm): nothing measured")
        return
    from tools.export_merged import export_merged
    from tools.vllm_embed import ReMatchVLLM
    work = a.work or tempfile.mkdtemp()
    dtype = getattr(torch, a.dtype)
    if a.checkpoint is None:                   # width-real Qwen2-VL-2B, full depth, K = 16
        from model import ReMatch
        from tools import width_real
        from util.backbone import load_backbone, save_rematch
        base = width_real.write_checkpoint("qwen2-vl-2b", os.path.join(work, "base"), num_layers=28,
                                           vision_depth=32, dtype=a.dtype)
        backbone, processor = load_backbone(str(base), device="cpu", dtype=dtype)
        model = ReMatch(backbone, num_tokens=16, embed_template="chat")
        a.checkpoint = os.path.join(work, "ckpt")
        save_rematch(model, processor, a.checkpoint, {"model": str(base), "num_tokens": 16,
                                                      "embed_template": "chat", "lora": False})
        del model, backbone
    export = os.path.join(work, "export")
    if not os.path.isdir(export):
        export_merged(a.checkpoint, export, dtype)
    xs = inputs()
    ref = {s: reference(a.checkpoint, dtype, s, xs) for s in ("q", "d")}

    llm = LLM(model=export, runner="pooling", dtype=a.dtype, max_model_len=4096,
              gpu_memory_utilization=0.5, enforce_eager=True,
              pooler_config={"task": "token_embed", "use_activation": False})
    rm = ReMatchVLLM(llm, export)
    rows = []
    for s, side in (("q", "query"), ("d", "document")):
        got = rm.embed([(t, im) if im is not None else t for t, im in xs], side)
        rows.append((f"exact route ({side})", got, ref[s]))
    del llm
    torch.cuda.empty_cache()
    default = LLM(model=export, runner="pooling", dtype=a.dtype, max_model_len=4096,
                  gpu_memory_utilization=0.5, enforce_eager=True)
    for s, side in (("q", "query"), ("d", "document")):
        prompts = []
        for text, image in xs:
            pr = {"prompt": rm_render(rm, text, image, side)}
            if image is not None:
                pr["multi_modal_data"] = {"image": image}
            prompts.append(pr)
        outs = default.embed(prompts, use_tqdm=False)
        got = torch.stack([torch.as_tensor(o.outputs.embedding, dtype=torch.float32) for o in outs])
        rows.append((f"vLLM default LAST ({side})", got, ref[s]))

    print(f"{torch.cuda.get_device_name()} | {a.dtype} | export {export} | {len(xs)} inputs per side")
    print(f"{'vLLM route':<28} {'max |Δ|':>10} {'min cosine':>11}")
    for name, got, want in rows:
        cos = F.cosine_similarity(got.float(), want, dim=-1)
        print(f"{name:<28} {(got.float() - want).abs().max():>10.2e} {cos.min():>11.6f}")


def rm_render(rm, text, image, side):
    from tools.vllm_embed import render
    return render(rm.tokenizer, text, image, side)


if __name__ == "__main__":
    main()
