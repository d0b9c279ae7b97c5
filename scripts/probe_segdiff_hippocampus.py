#!/usr/bin/env python
"""Probe SegDiff's Hippocampus profile cheaply: train its network on its data and, every ``probe_every`` iterations,
score the raw and EMA networks on the validation volumes' slices that hold hippocampus (one seeded 32^3 crop of
each of the first 8 validation volumes): the one-shot x0 estimate at t = 2, 10, 30, 60, 99 and one DDIM sample,
as anterior / posterior Dice of the class vote. A validation of the full profile takes ~5 minutes; this ~1.

    python scripts/probe_segdiff_hippocampus.py probe.json dataset_dir=../shared/data/hippocampus/Task04_Hippocampus \
        prediction=v_prediction lr=1e-3 iters=300

(docs/results.md, SegDiff on Hippocampus: eps vs v.) Options: prediction (epsilon | v_prediction), lr, iters,
probe_every, ema, eta, steps, seed, crops, dataset_dir, work_dir.
"""

import copy
import json
import sys
import time

import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose
from monai.utils import set_determinism

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import bundle  # noqa
from bundle.engines.steps.diffusion import DenoisingStep, denoising_loss  # noqa: E402

opts = dict(
    dataset_dir="../shared/data/hippocampus/Task04_Hippocampus",
    work_dir="/tmp/segdiff_probe",
    prediction="epsilon",
    lr=1e-3,
    iters=600,
    probe_every=100,
    ema=0.99,
    eta=1.0,
    steps=10,
    seed=0,
    crops=1,
)
for a in sys.argv[2:]:
    k, v = a.split("=")
    opts[k] = type(opts[k])(v) if k in opts else v
out = sys.argv[1]
set_determinism(opts["seed"])
C = str(REPO / "configs") + "/"
p = ConfigParser()
p.read_config(
    [
        C + "train.yaml",
        C + "methods/segdiff.yaml",
        C + "datasets/hippocampus.yaml",
        C + "profiles/segdiff_hippocampus.yaml",
    ]
)
p["dataset_dir"] = opts["dataset_dir"]
p["output_dir"] = opts["work_dir"]
p["bundle_root"] = opts["work_dir"]
p["crops_per_volume"] = opts["crops"]
p["tracking_uri"] = ""
p["sampling_eta"] = opts["eta"]
p["sampling_steps"] = opts["steps"]
p["prediction_type"] = opts["prediction"]
net = p.get_parsed_content("train_network")
sched = p.get_parsed_content("noise_scheduler")
step = DenoisingStep(sched)
sampler = p.get_parsed_content("sampler")
datalist = p.get_parsed_content("datalist")
train_loader = p.get_parsed_content("train#dataloader")
prepare = p.get_parsed_content("prepare_batch")
# probe: validation volumes, one seeded fg-centred crop each -> slices with hippocampus
val_tf = Compose(p.get_parsed_content("load_transforms") + p.get_parsed_content("train_transforms"))
val_tf.set_random_state(seed=7)
pi, pl = [], []
for item in datalist["validation"][:8]:
    d = val_tf(dict(item))
    d = d[0] if isinstance(d, list) else d
    img, lab = prepare({"image": d["image"][None], "label": d["label"][None]})
    keep = (lab[:, 1:] > 0).flatten(1).any(1)
    pi.append(img[keep])
    pl.append(lab[keep])
pi, pl = torch.cat(pi), torch.cat(pl)
print("probe slices", pi.shape, flush=True)


def dice_of(x, lab):
    # x: label estimate in [-1,1] (B,3,H,W) -> the highest class probability among those above 0.5 (the
    # evaluation's VoteArgmaxd gives ties to the lower class instead; they differ only where two classes pass 0.5)
    prob = ((x + 1) / 2).clamp(0, 1)
    votes = (prob > 0.5).float() * prob
    pred = votes.argmax(1)
    pred[(prob > 0.5).sum(1) == 0] = 0
    truth = lab.argmax(1)
    ds = []
    for c in (1, 2):
        a, b = pred == c, truth == c
        ds.append(float(2 * (a & b).sum() / (a.sum() + b.sum()).clamp(min=1)))
    return ds


@torch.no_grad()
def probe(model):
    model.eval()
    res = {}
    feats = model.encode_image(pi)
    g = torch.Generator().manual_seed(1)
    # one-shot x0 estimates at several t
    for t in (2, 10, 30, 60, 99):
        noise = torch.randn(pl.shape, generator=g)
        idx = torch.full((pl.shape[0],), t, dtype=torch.long)
        xt = sched.add_noise(pl, noise, idx)
        out = model(xt, idx, image_features=feats)
        x0, _ = sampler.step.predicted_x0(out, xt, float(sched.alphas_cumprod[t]))
        x0 = x0.clamp(-1, 1)
        res[f"x0_t{t}"] = dice_of(x0, pl)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(pl.shape[0])]
    x = sampler.chain(model, feats, tuple(pl.shape[1:]), gens)
    res["sample"] = dice_of(x, pl)
    model.train()
    return res


opt = torch.optim.AdamW(net.parameters(), lr=opts["lr"], weight_decay=0.0)
ema = copy.deepcopy(net)
log = {"opts": opts, "probes": []}
it, start, losses = 0, time.time(), []
while it < opts["iters"]:
    for batch in train_loader:
        image, label = prepare(batch)
        idx = torch.randint(0, sched.num_train_timesteps, (label.shape[0],))
        noise = torch.randn_like(label)
        pred = net(sched.add_noise(label, noise, idx), idx, image=image)
        loss = denoising_loss(step.target(label, noise, idx), pred)  # the training step's target and loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        it += 1
        d = min(opts["ema"], (1 + it) / (10 + it))
        with torch.no_grad():
            for pe, pn in zip(ema.parameters(), net.parameters()):
                pe.mul_(d).add_(pn, alpha=1 - d)
        losses.append(float(loss.detach()))
        if it % opts["probe_every"] == 0:
            r = {
                "it": it,
                "min": round((time.time() - start) / 60, 1),
                "loss": sum(losses[-20:]) / len(losses[-20:]),
                "raw": probe(net),
                "ema": probe(ema),
            }
            log["probes"].append(r)
            print(json.dumps(r), flush=True)
            json.dump(log, open(out, "w"), indent=1)
        if it >= opts["iters"]:
            break
torch.save(ema.state_dict(), out.replace(".json", "_ema.pt"))
