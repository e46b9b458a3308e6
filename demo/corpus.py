"""
The corpus the tiny offline tokenizer is trained on (util.backbone.build_tiny_tokenizer).

`tiny-qwen2-vl` / `tiny-qwen2.5-vl` use a small byte-level BPE trained offline. Any text
encodes (256 byte symbols), but only the strings below become short sequences: the
prompt templates of data.py, MMEB-style instructions, the target prompts, and every
string the synthetic benchmark writes. Shorter sequences make the CPU demo about twice
as fast per step and faster to learn.

This is the one place where the tiny model depends on the demo's strings: change a
template in data.py or a caption in demo/synthetic.py and the tiny vocabulary changes
with it (tests/test_demo.py pins the vocabulary's fingerprint so that such a change is
seen, not silent). Real checkpoints use their own tokenizer and never read this.
"""
from data import (IMAGE_PLACEHOLDER, MATCH_ANSWER, MATCH_FEAT, MATCH_H, MATCH_P, MATCH_RAW,
                  TARGET_BY_META)
from demo.synthetic import COLOURS, POSITIONS, SHAPES, SYNTHETIC_TEMPLATES, synthetic_texts

INSTRUCTIONS = (
    "Represent the given image for classification",
    "Represent the given image with the following question:",
    "Represent the given image.",
    "Represent the given image",
    "Represent the given text.",
    "Retrieve an image that matches the given caption:",
    "Find a caption describing the given image.",
    "Find an image caption describing the given image.",
    "Select the portion of the image that isolates the object labeled as",
    "Represent the given cropped image of the object",
    "Represent the answer to the question",
    "Represent the class label",
    "What colour is the", "What shape is on the", "How many objects are in the image?",
    "a picture of a", "on the", "and", "with", "is", "the", "of", "an", "image",
)


def tokenizer_corpus():
    """Deterministic list of strings the tiny BPE tokenizer is trained on."""
    templates = [MATCH_P, *MATCH_RAW["Q"], *MATCH_RAW["D"], *MATCH_FEAT["Q"], *MATCH_FEAT["D"],
                 MATCH_H, "".join((MATCH_ANSWER[0], "Yes", MATCH_ANSWER[1])),
                 "".join((MATCH_ANSWER[0], "No", MATCH_ANSWER[1])), *INSTRUCTIONS,
                 *sorted(set(TARGET_BY_META.values())), *SYNTHETIC_TEMPLATES]
    lines = templates * 20          # as frequent as the data words, so templates get merges
    for c in COLOURS:
        for s in SHAPES:
            lines.append(f"a {c} {s}")
            for p in POSITIONS:
                lines.append(f"What colour is the {s} on the {p}? {c}")
                lines.append(f"a {c} {s} on the {p}")
    lines += synthetic_texts()      # every query/document text make_synthetic writes
    lines += [" ".join(str(i) for i in range(10)), "Yes No yes no"]
    # image placeholders are special tokens, not text to learn merges from
    return [s.replace(IMAGE_PLACEHOLDER, "") for s in lines]
