"""
Video input without torchvision — plumbing behind evaluate.py and tools/mmeb_v2.py, none of
it in the paper (the paper trains and evaluates on images; MMEB-V2's 18 video tasks need it).

  frame_files(folder)        the frame images of one video, naturally sorted (frame_10
                             after frame_9), named errors for a missing or empty folder
                             and for a file that is not an image; hidden files (macOS
                             "._*" AppleDouble files among them) left out and counted
  sample_indices(n, k)       which of n frames the model sees: k evenly spaced,
                             linspace(0, n-1, k) truncated to int, when n >= k; all n
                             when n < k or k is None (MMEB-V2's reference harness)
  Clip                       one video input: its frame paths (or PIL images) and their
                             rate (Qwen2.5-VL's temporal positions, Qwen3-VL's timestamps)
  video_inputs(...)          frames → pixel_values_videos (gt·gh·gw, C·tp·p·p) and
                             video_grid_thw (1, 3), the backbone's own video input: each
                             frame through the family's image processor at the image
                             bounds (PIL resize, rescale, normalise, patches in merge
                             order; the harness sizes frames this way), frames stacked
                             in temporal patches of `temporal_patch_size` (2), an odd
                             count padded with the last frame
  video_text(...)            the video's placeholder run in the text: Qwen2/2.5-VL one
                             <|vision_start|><|video_pad|>×n<|vision_end|>; Qwen3-VL one
                             "<t seconds><|vision_start|>…<|vision_end|>" per temporal patch
  encode_video(...)          a clip → its text run, pixel_values_videos, video_grid_thw and
                             second_per_grid_ts (data.encode_item's video part)
  temporal_step, is_timestamped, video_time
                             the family's video M-RoPE rule (model.ReMatch.positions)

Why not the family's video processor: it needs torchvision (which breaks transformers'
processors here). The layout it produces is the one built here, checked in tests against
an independent loop over (t, h, w) patches and against the image path (two identical frames
= the image's duplicated temporal patch). Its resize is torchvision's bicubic on tensors;
here frames go through PIL's bicubic like images: pixel values differ slightly from a
torchvision run (docs/readings.md §10).

Tests: pytest tests/test_video.py
"""
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from util.inputs import VIDEO_PLACEHOLDER, VIDEO_TOKEN, BadImageError, load_image  # noqa: F401 (VIDEO_PLACEHOLDER: re-exported)

VIDEO_BLOCK = "<|vision_start|><|video_pad|><|vision_end|>"
NUM_FRAMES = 8                           # frames the model sees per clip (MMEB-V2)
FRAME_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DEFAULT_FPS = 2.0       # frames per second of a clip whose rate is unknown (docs/readings.md §10)


def natural_key(name):
    """'frame_10.jpg' → ('frame_', 10, '.jpg'): digit runs compare as numbers."""
    return tuple(int(s) if s.isdigit() else s.lower() for s in re.split(r"(\d+)", name))


def frame_files(folder, where="video", skipped=None):
    """The image files of a frame folder, naturally sorted. Hidden files (".*": macOS's
    "._*" AppleDouble files carry a frame's extension but no image; .DS_Store) are not
    frames: left out, and appended to the list `skipped` when one is given (the caller
    reports them). Subfolders are not frames either. FileNotFoundError naming `where` and
    the folder when it is missing or holds no image; ValueError naming the file when
    another file lacks an image extension (never passed over in silence)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{where}: no frame folder {folder}")
    names = []
    for n in os.listdir(folder):
        path = os.path.join(folder, n)
        if n.startswith("."):
            if skipped is not None:
                skipped.append(path)
        elif n.lower().endswith(FRAME_EXTS):
            names.append(n)
        elif not os.path.isdir(path):
            raise ValueError(f"{where}: {path} is not a frame image ({', '.join(FRAME_EXTS)}): "
                             "a frame folder holds the video's frames only")
    if not names:
        raise FileNotFoundError(f"{where}: the frame folder {folder} holds no image ({', '.join(FRAME_EXTS)})")
    return [os.path.join(folder, n) for n in sorted(names, key=natural_key)]


def sample_indices(n, k=NUM_FRAMES):
    """Indices into n naturally sorted frames: linspace(0, n-1, k) cast to int when n >= k;
    all n, as they are, when n < k or k is None. The harness's process_video_frames
    (src/utils/vision_utils/vision_utils.py) samples only when num_frames <= len(frames) and
    otherwise passes the frames it has, which the leaderboard's numbers use (its main
    branch pads short clips since 63ee24a, 2026-06; docs/readings.md §10). An odd count
    reaches the backbone as it is: video_inputs, like the family's video processor, repeats
    the last frame to fill the last temporal patch (temporal_patch_size 2)."""
    if n < 1 or (k is not None and k < 1):
        raise ValueError(f"sample_indices: need n >= 1 frames and k >= 1 (or None), got n={n}, k={k}")
    if k is not None and n >= k:
        return np.linspace(0, n - 1, k).astype(int).tolist()
    return list(range(n))


@dataclass(frozen=True)
class Clip:
    """One video input: `frames` the chosen frames in order (paths, encoded bytes or PIL
    images), `fps` the rate of those frames (None: DEFAULT_FPS) — what Qwen2.5-VL's
    temporal positions and Qwen3-VL's timestamps are computed from."""
    frames: tuple
    fps: float = None

    @classmethod
    def from_folder(cls, folder, num_frames=NUM_FRAMES, where="video", fps=None, skipped=None):
        """The clip of a frame folder: num_frames of its frames (sample_indices; None: all)."""
        paths = frame_files(folder, where, skipped)
        return cls(tuple(paths[i] for i in sample_indices(len(paths), num_frames)), fps)


def load_frames(clip, where="video"):
    """The clip's frames as RGB PIL images of one size: BadImageError naming the frame when
    one is unreadable or its size differs from the first's (frames of one video share it)."""
    frames = [f if hasattr(f, "size") else load_image(f, f"{where} frame {i}") for i, f in enumerate(clip.frames)]
    if not frames:
        raise ValueError(f"{where}: a clip without frames")
    bad = next((i for i, f in enumerate(frames) if f.size != frames[0].size), None)
    if bad is not None:
        raise BadImageError(f"{where}: frame {bad} is {frames[bad].size[0]}×{frames[bad].size[1]} px, "
                            f"frame 0 is {frames[0].size[0]}×{frames[0].size[1]}: one video's frames share a size")
    return [f.convert("RGB") for f in frames]


def video_inputs(image_processor, frames, min_pixels=None, max_pixels=None):
    """
    frames: F RGB PIL images of one size. Returns {"pixel_values_videos": (gt·gh·gw, C·tp·p·p),
    "video_grid_thw": (1, 3) = (gt, gh, gw)}, gt = ceil(F / tp): what the family's video
    processor gives for the same frames (up to the resize kernel). Each frame's patches
    come from the image processor — at its own pixel bounds unless min/max_pixels are
    given, as the reference harness sizes frames (one size for all, from the first frame:
    load_frames checks they share it) — which duplicates every patch over
    the temporal axis (an image is a one-frame video); frame j of a temporal patch fills
    temporal slot j instead.
    """
    lo = min_pixels or image_processor.size.shortest_edge
    hi = max_pixels or image_processor.size.longest_edge
    tp, p = image_processor.temporal_patch_size, image_processor.patch_size
    out = image_processor(images=list(frames), return_tensors="pt",
                          size={"shortest_edge": lo, "longest_edge": hi})
    grid = out["image_grid_thw"]                                            # (F, 3), rows equal
    F, n = len(frames), int(grid[0].prod())                                 # n patches per frame
    x = out["pixel_values"].view(F, n, -1, tp, p, p)[:, :, :, 0]            # (F, n, C, p, p)
    if F % tp:                                                              # pad with the last frame
        x = torch.cat([x, x[-1:].expand(tp - F % tp, *x.shape[1:])])
    gt = x.shape[0] // tp
    x = x.view(gt, tp, n, -1, p, p).permute(0, 2, 3, 1, 4, 5)              # (gt, n, C, tp, p, p)
    return {"pixel_values_videos": x.reshape(gt * n, -1),                   # (gt·n, C·tp·p·p)
            "video_grid_thw": torch.tensor([[gt, int(grid[0, 1]), int(grid[0, 2])]])}


def frame_times(n_frames, fps, temporal_patch_size=2):
    """Qwen3-VL's timestamp of each temporal patch (transformers' _calculate_timestamps for
    pre-sampled frames): the mean time of its first and last frame, frame i at i / fps."""
    idx = list(range(n_frames)) + [n_frames - 1] * (-n_frames % temporal_patch_size)
    t = [i / fps for i in idx]
    return [(t[i] + t[i + temporal_patch_size - 1]) / 2 for i in range(0, len(t), temporal_patch_size)]


def encode_video(processor, clip, where="video"):
    """One clip for the backbone: {"text": its placeholder run (video_text), "pixel_values_videos",
    "video_grid_thw" (1, 3), "second_per_grid_ts" (1,) = temporal patch size / fps}.
    Frames are bounded like images (processor.video_pixels = (min, max) overrides it);
    processor.video_timestamps says whether the family writes timestamps (load_backbone)."""
    ip = processor.image_processor
    frames = load_frames(clip, where)
    v = video_inputs(ip, frames, *getattr(processor, "video_pixels", (None, None)))
    fps = clip.fps or DEFAULT_FPS
    ts = frame_times(len(frames), fps, ip.temporal_patch_size) if getattr(processor, "video_timestamps", False) else None
    return {**v, "text": video_text(v["video_grid_thw"][0], ip.merge_size, ts),
            "second_per_grid_ts": torch.tensor([ip.temporal_patch_size / fps])}


def video_text(grid_thw, merge, timestamps=None):
    """The text that stands for one video of grid (gt, gh, gw): Qwen2/2.5-VL one vision block
    of gt·gh·gw / merge² pads; Qwen3-VL (timestamps given, one per temporal patch) one
    "<t seconds>" + vision block of gh·gw / merge² pads per temporal patch."""
    gt, gh, gw = (int(v) for v in grid_thw)
    per_frame = gh * gw // merge ** 2
    if timestamps is None:
        return "<|vision_start|>" + VIDEO_TOKEN * (gt * per_frame) + "<|vision_end|>"
    if len(timestamps) != gt:
        raise ValueError(f"video_text: {len(timestamps)} timestamps for {gt} temporal patches")
    return "".join(f"<{t:.1f} seconds><|vision_start|>" + VIDEO_TOKEN * per_frame + "<|vision_end|>"
                   for t in timestamps)


def temporal_step(config, second_per_grid_ts, n_videos):
    """The M-RoPE temporal step between two temporal patches of each video, (n_videos,)
    float32: Qwen2-VL 1; Qwen2.5-VL tokens_per_second · second_per_grid_t (the video's
    temporal patch size / fps; get_rope_index's time_interval). Qwen3-VL does not use it
    (a timestamp before every temporal patch: is_timestamped)."""
    if not config.model_type.startswith("qwen2_5"):
        return torch.ones(n_videos)
    if second_per_grid_ts is None or len(second_per_grid_ts) != n_videos:
        raise ValueError(f"Qwen2.5-VL video positions need second_per_grid_ts for each of the {n_videos} videos")
    return config.vision_config.tokens_per_second * torch.as_tensor(second_per_grid_ts, dtype=torch.float32)


def is_timestamped(config):
    """Qwen3-VL writes a timestamp before every temporal patch of a video."""
    return config.model_type.startswith("qwen3")


def video_time(cfg, video_grid_thw, second_per_grid_ts, device):
    """
    The time rule of videos' M-RoPE positions, as the backbone's get_rope_index applies it:
    (video_grid_thw, step) for mrope_position_ids. Qwen2-VL steps time by 1 per temporal
    patch, Qwen2.5-VL by tokens_per_second · second_per_grid_t (temporal_step:
    step (n_vid,)); Qwen3-VL writes a timestamp before each temporal patch, so each is its
    own one-frame grid (Σ gt, 3), step None (its get_rope_index splits video_grid_thw the
    same way). (None, None) without videos.
    """
    if video_grid_thw is None:
        return None, None
    video_grid_thw = video_grid_thw.to(device)
    if is_timestamped(cfg):                                                   # (Σ gt, 3), t = 1
        video_grid_thw = torch.repeat_interleave(video_grid_thw, video_grid_thw[:, 0], dim=0)
        video_grid_thw[:, 0] = 1
        return video_grid_thw, None
    return video_grid_thw, temporal_step(cfg, second_per_grid_ts, len(video_grid_thw))   # (n_vid,)
