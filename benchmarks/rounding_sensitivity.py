"""How much CAME and AdamW trajectories amplify a rounding difference (single process).

Command: ``OMP_NUM_THREADS=1 python benchmarks/rounding_sensitivity.py >
benchmarks/results/distributed/rounding_sensitivity.txt``. The tiny GPT of ``gpt_fsdp.py`` is
trained
12 steps twice on the same batches, once with the batch whole and once as two accumulated
micro-batches (the gradients then differ only in summation order); printed is the relative
loss difference per step. No distribution is involved.
"""

import torch

from torchcame import CAME
from torchcame.recipes.data import BatchSampler, load_corpus
from torchcame.recipes.gpt_fsdp import build_parser, model_from_args

torch.set_num_threads(1)
args = build_parser().parse_args([])
corpus = load_corpus(None, max_bytes=2_000_000)


def run(opt_name: str, split: int, clip: bool) -> list[float]:
    model = model_from_args(args)
    params = list(model.parameters())
    opt = CAME(params, lr=2e-3) if opt_name == "came" else torch.optim.AdamW(params, lr=2e-3)
    sampler = BatchSampler(corpus.train, 8, 65, seed=0)
    losses = []
    for step in range(12):
        for g in opt.param_groups:
            g["lr"] = 2e-3 * min(1, (step + 1) / 5)
        tokens = next(sampler)
        total = 0.0
        for part in tokens.chunk(split):
            logits = model(input_ids=part[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, 256), part[:, 1:].reshape(-1)) / split
            loss.backward()
            total += loss.item()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses


for name in ("came", "adamw"):
    for clip in (True, False):
        a, b = run(name, 1, clip), run(name, 2, clip)
        print(name, "clip" if clip else "noclip", " ".join(f"{abs(x - y) / x:.1e}"
                                                          for x, y in zip(a, b)))
