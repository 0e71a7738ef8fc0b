"""What a plain-transformers user writes to score a video the KVQ way (the baseline of
scripts/bench_one_video.py): no qalign_kvq code.

    python scripts/plain_transformers_scoring.py --model DIR --video x.mp4

12 evenly spaced frames read with decord ``VideoReader.get_batch``; FiveCrop (0.8 of each side,
torchvision's boxes) as numpy slices; for each of the five views one processor call (the chat
template's prompt + "The quality of the video is") and one forward; the softmax over the five level
words' logits at the last position; the expected level (excellent 5 ... bad 1) of each view,
averaged with the centre weighted 2 against 1 for each corner. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import decord
import numpy as np
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

LEVEL_WORDS = ("excellent", "good", "fair", "poor", "bad")
LEVEL_SCORES = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
QUESTION = "How would you rate the quality of this video?"
ANSWER_PREFIX = "The quality of the video is"


class PlainScorer:
    """A model, its processor and the level words' token ids."""

    def __init__(self, path: str):
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = self.processor.tokenizer
        self.level_ids = []
        for word in LEVEL_WORDS:
            ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"level word {word!r} is {len(ids)} tokens")
            self.level_ids.append(ids[0])
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
        self.prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True,
                                                         tokenize=False) + ANSWER_PREFIX

    def score(self, video: str, frames: int = 12, ratio: float = 0.8, center_weight: float = 2.0) -> dict:
        vr = decord.VideoReader(video, ctx=decord.cpu(0))
        n, fps = len(vr), float(vr.get_avg_fps())
        indices = [min(n - 1, int((j + 0.5) * n / frames)) for j in range(frames)]
        clip = vr.get_batch(indices).asnumpy()  # (T, H, W, 3) uint8 RGB
        _, h, w, _ = clip.shape
        ch, cw = round(h * ratio), round(w * ratio)
        boxes = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw),
                 (int(round((h - ch) / 2)), int(round((w - cw) / 2)))]  # corners, then the centre
        metadata = {"fps": fps, "total_num_frames": n, "frames_indices": indices, "duration": n / fps}
        view_scores = []
        with torch.inference_mode():
            for top, left in boxes:
                crop = clip[:, top:top + ch, left:left + cw]
                inputs = self.processor(text=[self.prompt], videos=[crop], do_sample_frames=False,
                                        video_metadata=[metadata], return_tensors="pt")
                logits = self.model(**inputs, logits_to_keep=1).logits[0, -1]
                probs = torch.softmax(logits[self.level_ids].float(), dim=-1).numpy()
                view_scores.append(float(probs @ LEVEL_SCORES))
        weights = np.array([1.0, 1.0, 1.0, 1.0, center_weight])
        return {"file": video, "score_1_5": float(weights @ np.array(view_scores) / weights.sum()),
                "view_scores": view_scores, "frames": indices}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--video", required=True)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    scorer = PlainScorer(args.model)
    t0 = time.perf_counter()
    result = scorer.score(args.video)
    result["seconds"] = time.perf_counter() - t0
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
