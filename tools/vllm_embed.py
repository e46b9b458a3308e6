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

    from vllm import LLM
    from vllm_embed import ReMatchVLLM
    llm = LLM(model="runs/demo/merged", runner="pooling",
              pooler_config={"task": "token_embed", "use_activation": False})
    rm = ReMatchVLLM(llm, "runs/demo/merged")
    E_q = rm.embed(["a dog on a beach"], side="query")                       # (1, d)
    E_d = rm.embed([("<|image_1|>\\nRepresent the given image.", pil_image)], side="document")

An input is a text (the MMEB string, instruction included) or a (text, image) pair whose
text marks the image with <|image_1|> (without the mark the image goes first, as
Encoder.encode places it). bench/vllm_parity.py checks this against ReMatch.embed on a GPU.
"""
import json
import os

import torch
import torch.nn.functional as F


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


class ReMatchVLLM:
    """A vLLM LLM (runner="pooling", task token_embed) + the export's tokenizer and pooling
    description (rematch_pooling.json)."""

    def __init__(self, llm, export_dir):
        from transformers import AutoTokenizer
        with open(os.path.join(export_dir, "rematch_pooling.json")) as f:
            self.spec = json.load(f)
        self.tokenizer = AutoTokenizer.from_pretrained(export_dir)
        self.llm = llm
        self.side_ids = {side: self.tokenizer.convert_tokens_to_ids(self.spec[f"{side}_tokens"])
                         for side in ("query", "document")}

    def embed(self, inputs, side="query"):
        """inputs: texts or (text, image) pairs → (N, d) L2-normalised, fp32 on the CPU."""
        from vllm import PoolingParams
        if side not in self.side_ids:
            raise ValueError(f"side must be 'query' or 'document', got {side!r}")
        prompts = []
        for x in inputs:
            text, image = x if isinstance(x, tuple) else (x, None)
            p = {"prompt": render(self.tokenizer, text, image, side)}
            if image is not None:
                p["multi_modal_data"] = {"image": image}
            prompts.append(p)
        outs = self.llm.encode(prompts, pooling_task="token_embed",
                               pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
        return torch.stack([pool(o.prompt_token_ids, torch.as_tensor(o.outputs.data), self.side_ids[side])
                            for o in outs]).cpu()
