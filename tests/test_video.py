"""
Video input (util/video.py, model.py's video path): which frames, how they become the
backbone's video input, and that ReMatch's embedding pass over them is the backbone's own
forward. Tiny backbones here (all three families); tests/test_real_path.py runs the same
forward oracle at real widths with Qwen's tokenizer.

  - frame folders sort naturally (frame_10 after frame_9) and the 8 frames are the
    harness's linspace choice, hand-listed; fewer frames are passed as they are (an odd
    count: the processor's last temporal patch repeats the last frame, as transformers');
    hidden files (macOS "._*" AppleDouble, .DS_Store) are left out and listed, another
    file that is not an image is named, as is a frame that does not decode
  - pixel_values_videos == an independent loop over (temporal patch, row, col) patches of
    the PIL-resized, normalised frames; two identical frames == the image path's patches
    (an image is a one-frame video with the temporal patch duplicated)
  - the text: Qwen2/2.5-VL one block of gt·gh·gw/4 pads; Qwen3-VL one timestamped block
    per temporal patch, equal to transformers' own replace_video_token
  - ReMatch.embed's pieces on a batch mixing a video row and an image row == the
    backbone's forward (its get_rope_index, video features, DeepStack) at every position

Run: pytest tests/test_video.py
"""
import types

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shape_image
from data import collate_embed, encode_item
from model import ReMatch
from util.video import (Clip, encode_video, frame_files, frame_times, sample_indices, video_inputs,
                        video_text)


def noise_frame(seed, size=(90, 70)):
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


@pytest.fixture
def frame_dir(tmp_path):
    """frame_1.jpg .. frame_12.jpg (no zero padding: a plain sort puts frame_10 after frame_1)
    and two hidden files that are not frames: a macOS AppleDouble "._frame_3.jpg" (a frame's
    extension, no image) and .DS_Store."""
    d = tmp_path / "vid0"
    d.mkdir()
    for i in range(1, 13):
        noise_frame(i, (32, 32)).save(d / f"frame_{i}.jpg")
    (d / "._frame_3.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    (d / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return d


def test_frames_sort_naturally_and_the_harness_choice_is_taken(frame_dir, tmp_path):
    skipped = []
    names = [p.rsplit("/", 1)[1] for p in frame_files(str(frame_dir), skipped=skipped)]
    assert names == [f"frame_{i}.jpg" for i in range(1, 13)]                 # frame_10 after frame_9
    assert sorted(p.rsplit("/", 1)[1] for p in skipped) == [".DS_Store", "._frame_3.jpg"]   # hidden: left out
    # linspace(0, 11, 8) = 0, 1.57, 3.14, 4.71, 6.29, 7.86, 9.43, 11 → int: 0 1 3 4 6 7 9 11
    clip = Clip.from_folder(str(frame_dir))
    assert [p.rsplit("/", 1)[1] for p in clip.frames] == [
        "frame_1.jpg", "frame_2.jpg", "frame_4.jpg", "frame_5.jpg", "frame_7.jpg", "frame_8.jpg",
        "frame_10.jpg", "frame_12.jpg"]
    assert sample_indices(64) == [0, 9, 18, 27, 36, 45, 54, 63]
    assert sample_indices(10) == [0, 1, 2, 3, 5, 6, 7, 9]                     # 1.29, 2.57, 3.86, 5.14 ...
    assert sample_indices(3) == [0, 1, 2]                                     # fewer than 8: as they are
    assert sample_indices(8) == list(range(8)) and sample_indices(12, None) == list(range(12))
    assert len(Clip.from_folder(str(frame_dir), None).frames) == 12           # None: every frame
    with pytest.raises(ValueError, match="sample_indices: need n >= 1 frames"):
        sample_indices(0)
    with pytest.raises(FileNotFoundError, match="no frame folder .*missing"):
        frame_files(str(tmp_path / "missing"), "MSR-VTT video7")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="MSR-VTT video7: the frame folder .* holds no image"):
        frame_files(str(tmp_path / "empty"), "MSR-VTT video7")
    (tmp_path / "empty" / "._frame_1.jpg").write_bytes(b"\x00\x05\x16\x07")   # hidden files only: no image
    with pytest.raises(FileNotFoundError, match="holds no image"):
        frame_files(str(tmp_path / "empty"), "MSR-VTT video7")


def test_a_file_that_is_not_a_frame_is_named(frame_dir):
    """Only hidden files are passed over: another file without an image extension stops the
    clip naming its path, and a frame that does not decode is named when its clip is read."""
    from util.inputs import BadImageError
    from util.video import load_frames
    (frame_dir / "notes.txt").write_text("not a frame")
    with pytest.raises(ValueError, match=f"MSR-VTT video7: {frame_dir}/notes.txt is not a frame image"):
        frame_files(str(frame_dir), "MSR-VTT video7")
    (frame_dir / "notes.txt").unlink()
    (frame_dir / "frame_4.jpg").write_bytes(b"not a jpeg")                    # among the 8 chosen
    clip = Clip.from_folder(str(frame_dir))
    with pytest.raises(BadImageError, match=f"MSR-VTT video7 frame 2: cannot read image {frame_dir}/frame_4.jpg"):
        load_frames(clip, "MSR-VTT video7")


def naive_video_patches(frames, ip, lo, hi):
    """Independent oracle: each frame resized (PIL bicubic, the smart_resize size), scaled to
    [0, 1], normalised; the frame list padded to a multiple of tp with the last frame; then
    one row per (temporal patch, merged row, merged col, row in merge, col in merge), each
    row the (C, tp, p, p) block."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    p, m, tp = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    W, H = frames[0].size
    h, w = smart_resize(H, W, factor=p * m, min_pixels=lo, max_pixels=hi)
    mean, std = np.array(ip.image_mean)[:, None, None], np.array(ip.image_std)[:, None, None]
    arr = [((np.asarray(f.resize((w, h), Image.BICUBIC), dtype=np.float64).transpose(2, 0, 1) / 255.0) - mean) / std
           for f in frames]
    arr += [arr[-1]] * (-len(arr) % tp)
    rows = []
    for t in range(len(arr) // tp):
        for bh in range(h // p // m):
            for bw in range(w // p // m):
                for mh in range(m):
                    for mw in range(m):
                        r, c = (bh * m + mh) * p, (bw * m + mw) * p
                        block = np.stack([arr[t * tp + j][:, r:r + p, c:c + p] for j in range(tp)], axis=1)
                        rows.append(block.reshape(-1))                        # (C, tp, p, p) flattened
    return torch.tensor(np.stack(rows), dtype=torch.float32), (len(arr) // tp, h // p, w // p)


def test_pixel_values_videos_equal_a_loop_over_patches_and_the_image_path(tiny):
    _, _, processor = tiny
    ip = processor.image_processor
    lo, hi = ip.size.shortest_edge, ip.size.longest_edge                     # frames are bounded like images
    frames = [noise_frame(i) for i in range(5)]                              # odd: padded
    v = video_inputs(ip, frames, lo, hi)
    ref, grid = naive_video_patches(frames, ip, lo, hi)
    assert v["video_grid_thw"].tolist() == [list(grid)] and grid[0] == 3
    assert (v["pixel_values_videos"] - ref).abs().max() < 1e-5
    # two identical frames: exactly the image processor's output for the image
    im = noise_frame(7)
    img = ip(images=[im], return_tensors="pt", size={"shortest_edge": lo, "longest_edge": hi})
    two = video_inputs(ip, [im, im], lo, hi)
    assert torch.equal(two["pixel_values_videos"], img["pixel_values"])
    assert torch.equal(two["video_grid_thw"], img["image_grid_thw"])
    # mutation: the frame order matters
    swapped = video_inputs(ip, [frames[1], frames[0], *frames[2:]], lo, hi)
    assert not torch.equal(swapped["pixel_values_videos"], v["pixel_values_videos"])


def test_a_short_clip_reaches_the_backbone_as_it_is(tiny, tmp_path):
    """A folder of 3 frames: the clip holds the 3 (no padding to 8); its video input has
    ceil(3/2) = 2 temporal patches, the second one frame 3 twice (the family's processor
    fills an odd count so: transformers' Qwen2-VL / Qwen3-VL video processors pad
    -num_frames % temporal_patch_size frames with the last), == the independent loop; one
    frame: one temporal patch. Qwen3-VL's timestamps at 2 fps: frames at 0, .5, 1 s and the
    repeat at 1 s → patches at (0 + .5)/2 = .25 s and (1 + 1)/2 = 1 s."""
    _, _, processor = tiny
    ip = processor.image_processor
    d = tmp_path / "short"
    d.mkdir()
    for i in range(3):
        noise_frame(i, (40, 30)).save(d / f"frame_{i}.png")
    clip = Clip.from_folder(str(d))
    assert [p.rsplit("/", 1)[1] for p in clip.frames] == ["frame_0.png", "frame_1.png", "frame_2.png"]
    v = encode_video(processor, clip)
    frames = [Image.open(p).convert("RGB") for p in clip.frames]
    lo, hi = ip.size.shortest_edge, ip.size.longest_edge
    ref, grid = naive_video_patches(frames, ip, lo, hi)
    assert v["video_grid_thw"].tolist() == [list(grid)] and grid[0] == 2
    assert (v["pixel_values_videos"] - ref).abs().max() < 1e-5
    per = grid[1] * grid[2]                                                  # patches per temporal patch
    last = v["pixel_values_videos"][per:].view(per, 3, 2, -1)                # (n, C, tp, p·p)
    assert torch.equal(last[:, :, 0], last[:, :, 1])                         # frame 3 in both slots
    one = encode_video(processor, Clip(clip.frames[:1]))
    assert one["video_grid_thw"][0, 0].item() == 1
    assert frame_times(3, 2.0) == [0.25, 1.0]


def test_video_text_is_transformers_layout():
    """Qwen3-VL: transformers' own replace_video_token (called on a stand-in processor,
    its video processor needs torchvision); Qwen2/2.5-VL: one run of gt·gh·gw/4 pads."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata
    grid = torch.tensor([[3, 4, 6]])
    assert video_text(grid[0], 2) == "<|vision_start|>" + "<|video_pad|>" * 18 + "<|vision_end|>"
    fake = types.SimpleNamespace(video_processor=types.SimpleNamespace(merge_size=2, temporal_patch_size=2),
                                 vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>",
                                 video_token="<|video_pad|>")
    fake._calculate_timestamps = types.MethodType(Qwen3VLProcessor._calculate_timestamps, fake)
    for fps in (2.0, 24.0):
        meta = VideoMetadata(total_num_frames=5, fps=fps, frames_indices=list(range(5)))
        theirs = Qwen3VLProcessor.replace_video_token(fake, {"video_grid_thw": grid, "video_metadata": [meta]}, 0)
        assert video_text(grid[0], 2, frame_times(5, fps)) == theirs
    assert frame_times(5, 2.0) == [0.25, 1.25, 2.0]                          # (0+.5)/2, (1+1.5)/2, (2+2)/2


def hf_forward_hidden(model, batch, processor):
    """The backbone's own forward on the batch (mm_token_type_ids: 1 image pad, 2 video pad)."""
    ids = batch["input_ids"]
    vid = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    kw = dict(input_ids=ids, attention_mask=batch["attention_mask"],
              mm_token_type_ids=(ids == model.config.image_token_id).long() + 2 * (ids == vid).long(),
              pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
              pixel_values_videos=batch["pixel_values_videos"], video_grid_thw=batch["video_grid_thw"])
    if model.config.model_type == "qwen2_5_vl":
        kw["second_per_grid_ts"] = batch["second_per_grid_ts"]
    return model(**kw, output_hidden_states=True, use_cache=False).hidden_states[-1]


def ours_hidden(rm, batch, drop_deepstack=False):
    ids, am, token_idx, x, pos, deepstack = rm.embed_inputs(batch, "q")
    return rm.last_hidden(x, am, pos, **({} if drop_deepstack else deepstack))


def video_batch(processor, fps=None):
    """Row 0: a 5-frame clip (odd: padded) in a question; row 1: an image (row-major order of
    images and videos is mixed)."""
    clip = Clip(tuple(noise_frame(i) for i in range(5)), fps)
    items = [encode_item(processor, "<|video_1|>\nWhat happens in the video?", video=clip, where="t"),
             encode_item(processor, "<|image_1|>\nRepresent the image.", shape_image("red", (84, 56)))]
    return collate_embed(items, processor.tokenizer, 0)


def test_video_embedding_path_equals_the_backbone_forward(tiny):
    name, model, processor = tiny
    rm = ReMatch(model, num_tokens=0).eval()
    for fps in (None, 1.0):                                   # Qwen2.5-VL: 2 and 1 position steps
        batch = video_batch(processor, fps)
        with torch.no_grad():
            ref = hf_forward_hidden(model, batch, processor)                  # (2, T, d)
            h = ours_hidden(rm, batch)
        real = batch["attention_mask"].bool()
        diff = (h - ref)[real].abs().max().item()
        assert diff <= 1e-5, (name, fps, diff)
    with torch.no_grad():                                     # mutations: each piece is needed
        if name == "tiny-qwen3-vl":
            assert (ours_hidden(rm, batch, drop_deepstack=True) - ref)[real].abs().max() > 1e-4
        if name == "tiny-qwen2.5-vl":                         # other temporal positions
            other = dict(batch, second_per_grid_ts=batch["second_per_grid_ts"] * 4)
            assert (ours_hidden(rm, other) - ref)[real].abs().max() > 1e-4


def test_video_item_checks_are_named(tiny):
    _, _, processor = tiny
    clip = Clip((noise_frame(0), noise_frame(1)))
    with pytest.raises(ValueError, match="row 3: a video was given but the text has 0 <\\|video_1\\|>"):
        encode_item(processor, "no mark", video=clip, where="row 3")
    with pytest.raises(ValueError, match="row 3: text has <\\|video_1\\|> but no video"):
        encode_item(processor, "<|video_1|> x", where="row 3")
    with pytest.raises(ValueError, match="holds <\\|video_pad\\|> itself"):
        encode_item(processor, "<|video_1|> <|video_pad|>", video=clip, where="row 3")
    with pytest.raises(Exception, match="MSR-VTT v1: frame 1 is 32×32 px, frame 0 is 90×70"):
        encode_video(processor, Clip((noise_frame(0), noise_frame(1, (32, 32)))), "MSR-VTT v1")
