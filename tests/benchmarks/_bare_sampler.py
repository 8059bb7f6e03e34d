"""The bare sampler as a plain process: the baseline of the Ray generate benchmark.

Run as ``python _bare_sampler.py '<json>'`` with ``model``, ``device``, ``steps``, ``batch``,
``threads`` and ``blocks`` (a list of ``[start, stop]`` seed ranges). It loads the model, warms up,
prints ``READY``, waits for one line on stdin (so that several such processes start sampling
together, as the Ray workers do), samples each block exactly as the generate stage's actor does
(h recorded as float16, no writes) and prints ``RESULT_JSON`` with the seconds of each block.
"""

from __future__ import annotations

import json
import sys
import time


def main(spec: dict) -> dict:
    import torch

    from hspace.model import HSpaceModel
    from hspace.sampling import HSpaceSampler

    torch.set_num_threads(int(spec["threads"]))
    model = HSpaceModel.from_pretrained(spec["model"], device=spec["device"])
    sampler = HSpaceSampler(model, sampler="ddpm", num_inference_steps=int(spec["steps"]))
    sampler.sample([0, 1], record_h=True, h_dtype=torch.float16, batch_size=int(spec["batch"]))  # warm-up
    print("READY", flush=True)
    sys.stdin.readline()
    seconds = []
    for start, stop in spec["blocks"]:
        t0 = time.perf_counter()
        traj = sampler.sample(
            list(range(start, stop)), record_h=True, h_dtype=torch.float16, batch_size=int(spec["batch"])
        )
        traj.h.cpu().numpy()
        seconds.append(time.perf_counter() - t0)
    return {"block_seconds": seconds}


if __name__ == "__main__":
    print("RESULT_JSON " + json.dumps(main(json.loads(sys.argv[1]))), flush=True)
