"""Can a pure-noise (k = 0) reward model learn from a k-step teacher? The toy world's answer.

    .venv/bin/python bench/toy_k0_student.py label --samples 16000 --out labels-0.safetensors [--offset 0]
    .venv/bin/python bench/toy_k0_student.py train --labels labels-0.safetensors[,labels-1.safetensors] [--steps 2000] [--center]

``label`` draws ``samples`` fresh noises for the *training* prompts of the toy distill split
(``split_by_prompt`` with the toy recipe's eval_fraction 0.15 and seed 0; seeds 100000 + offset
upwards, never a collected seed) and stores the teacher's overall logit of each
(``reward_models/toy-k3-x0``: x0 after 3 DDIM steps). ``train`` fits a fresh k = 0 model of
the toy k = 0 architecture (``reward_models/toy/config.json``) to the standardised teacher
logits by MSE (``--center``: minus each prompt's mean, so only the ranking of seeds is
taught) and prints, every 250 steps, its pairwise accuracy on the held-out prompts' collected
rows — the distill stage's metric against the judge (prompt-only baseline 0.500; the teacher
itself: 0.732 on the same 433 pairs). Needs the toy collect in outputs/toy/collect.
Results: docs/distill.md ("A k = 0 student of the k = 3 model").
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from noisealign.data.feedback import clean_feedback, load_feedback, split_by_prompt
from noisealign.noise import batch_noise
from noisealign.pipelines import encode_prompts, load_pipeline
from noisealign.policies.training import reward_logits
from noisealign.rewards import build_reward_model
from noisealign.rewards.loading import load_reward_model
from noisealign.rewards.metrics import pairwise_accuracy
from noisealign.toy import pipeline_path

TEACHER = "reward_models/toy-k3-x0"
STUDENT_CONFIG = "reward_models/toy/config.json"


def held_out_accuracy(model, pipe, rows, eval_ids, prompt_of) -> tuple[float, int]:
    """Pairwise accuracy of ``model`` against the judge on the held-out prompts' collected rows."""
    held_out = set(eval_ids)
    idx = [i for i, p in enumerate(rows.prompt_ids) if p in held_out]
    ids, seeds = [rows.prompt_ids[i] for i in idx], [rows.seeds[i] for i in idx]
    out = []
    with torch.no_grad():
        for s in range(0, len(idx), 64):
            emb = encode_prompts(pipe, [prompt_of[p] for p in ids[s : s + 64]])
            noise = batch_noise(ids[s : s + 64], seeds[s : s + 64], rows.latent_shape)
            out.append(reward_logits(model, noise, emb, pipe))
    group = torch.tensor([eval_ids.index(p) for p in ids])
    return pairwise_accuracy(torch.cat(out), rows.overall[idx], group)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("label", "train"))
    parser.add_argument("--samples", type=int, default=16000)
    parser.add_argument("--offset", type=int, default=0, help="first seed is 100000 + offset")
    parser.add_argument("--out", default="k0_student_labels.safetensors")
    parser.add_argument(
        "--labels", default="k0_student_labels.safetensors", help="comma-separated label files"
    )
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--center", action="store_true")
    parser.add_argument(
        "--seed", type=int, default=0, help="student initialisation and batch order"
    )
    parser.add_argument(
        "--save", default=None, help="save the trained student here (a reward model folder)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load_pipeline(str(pipeline_path()))
    rows = clean_feedback(load_feedback("outputs/toy/collect/dataset"))
    train_ids, eval_ids = split_by_prompt(rows.prompt_ids, 0.15, 1, 0)
    prompt_of = dict(zip(rows.prompt_ids, rows.prompts))

    def embed(ids):
        return encode_prompts(pipe, [prompt_of[p] for p in ids])

    if args.mode == "label":
        teacher = load_reward_model(TEACHER).eval()
        print("teacher held-out pairwise accuracy", held_out_accuracy(teacher, pipe, rows, eval_ids, prompt_of))  # fmt: skip
        n = args.samples
        ids = [train_ids[i % len(train_ids)] for i in range(n)]
        seeds = [100000 + args.offset + i // len(train_ids) for i in range(n)]
        logits, start = [], time.time()
        with torch.no_grad():
            for s in range(0, n, 128):
                noise = batch_noise(ids[s : s + 128], seeds[s : s + 128], rows.latent_shape)
                logits.append(reward_logits(teacher, noise, embed(ids[s : s + 128]), pipe))
        print(f"{n} noises labelled in {time.time() - start:.0f} s")
        save_file({"logits": torch.cat(logits)}, args.out, metadata={"ids": json.dumps(ids), "seeds": json.dumps(seeds)})  # fmt: skip
        return

    ids, seeds, y = [], [], []
    for path in args.labels.split(","):
        with safe_open(path, "pt") as f:
            ids += json.loads(f.metadata()["ids"])
            seeds += json.loads(f.metadata()["seeds"])
            y.append(f.get_tensor("logits"))
    y = torch.cat(y)
    if args.center:
        groups = defaultdict(list)
        for i, p in enumerate(ids):
            groups[p].append(i)
        for idx in groups.values():
            y[idx] = y[idx] - y[idx].mean()
    y = (y - y.mean()) / y.std()
    fields = {
        k: v for k, v in json.loads(open(STUDENT_CONFIG).read()).items() if k != "architecture"
    }
    torch.manual_seed(args.seed)
    model = build_reward_model("transformer", **fields)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-3, total_steps=args.steps, pct_start=0.05)  # fmt: skip
    generator = torch.Generator().manual_seed(args.seed)
    print(f"{len(ids)} teacher-labelled noises of {len(set(ids))} training prompts")
    for step in range(1, args.steps + 1):
        b = torch.randint(0, len(ids), (args.batch_size,), generator=generator).tolist()
        emb = embed([ids[i] for i in b])
        noise = batch_noise([ids[i] for i in b], [seeds[i] for i in b], rows.latent_shape)
        loss = torch.nn.functional.mse_loss(model(noise, emb.embeds, emb.mask, emb.pooled).overall_logit, y[b])  # fmt: skip
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0:
            model.eval()
            accuracy, pairs = held_out_accuracy(model, pipe, rows, eval_ids, prompt_of)
            model.train()
            print(json.dumps({"step": step, "loss": round(loss.item(), 4), "pairwise_accuracy": round(accuracy, 4), "pairs": pairs}))  # fmt: skip
    if args.save:
        model.eval().save_pretrained(args.save)


if __name__ == "__main__":
    main()
