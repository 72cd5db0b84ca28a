"""Robustness evaluation (``vpure eval``): every defence against every attack, per clip, cached.

A job is (defence, attack, clip index) on a split of the mini-world. Its result (true
label, defended label, member votes, route, alpha, the attack's loss trace) is written as
one JSON file under ``<out>/cache/<run key>/``; a rerun skips finished jobs (resumable) and
the tables are regenerated from the cache alone. Jobs are independent and seeded from
their own names, so running them in any order, in worker processes or on Ray gives the
same results.

Attacks (L-inf unless named ``_l2``; eps, step, iterations from :class:`EvalConfig`):

- ``clean``: no attack (Standard Acc);
- ``pgd``: gray-box PGD on the bare recogniser, then defended (Robust Acc*);
- ``pgd_bpda``: PGD through the defence by BPDA, gradient averaged over its voting members;
- ``eot_bpda``: BPDA averaged over ``eot_samples`` draws of a stochastic defence;
- ``tt``: temporal translation over BPDA (shifts -2..2);
- ``apgd_ce`` / ``apgd_dlr``: APGD over BPDA;
- ``fullgrad``: PGD with the exact gradient of VideoPure (VideoPure variants only);
- ``pgd_l2``: L2 PGD over BPDA;
- ``sparse``: gray-box PGD on ``sparse_k`` frames;
- ``gate``: fool the recogniser while keeping the frame classifier's labels consistent.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from vpure.runtime import atomic
from vpure.runtime.config import ConfigBase, check
from vpure.runtime.errors import ConfigError
from vpure.runtime.log import get_logger

log = get_logger(__name__)

DEFENCES = ("none", "jpeg", "wd", "ts", "diffpure_ddpm", "diffpure_ddim", "ddim_inversion", "videopure",
            "videopure_no_ti", "videopure_no_sto", "videopure_no_vote", "shield")
ATTACKS = ("clean", "pgd", "pgd_bpda", "eot_bpda", "tt", "apgd_ce", "apgd_dlr", "fullgrad", "pgd_l2", "sparse", "gate")
STOCHASTIC = {"ts", "diffpure_ddpm", "diffpure_ddim"}
VIDEOPURE = {"videopure", "videopure_no_ti", "videopure_no_sto", "videopure_no_vote"}


@dataclass(frozen=True)
class EvalConfig(ConfigBase):
    split: str = "test"
    clips: int = 20
    eps: float = 8 / 255  # 64-pixel clips (the paper's 4/255 is for 224)
    step: float = 2 / 255
    iters: int = 10
    eps_l2: float = 1.0
    eot_samples: int = 4
    sparse_k: int = 2
    fullgrad_iters: int = 5
    flow: str = "dis"  # flow provider of the VideoPure variants: dis or raft
    seed: int = 0

    def validate(self) -> None:
        check(self.clips >= 1 and self.iters >= 1 and self.fullgrad_iters >= 1, "EvalConfig counts must be >= 1")
        check(0 < self.eps <= 1 and 0 < self.step <= 1, "EvalConfig.eps and step must be in (0, 1]")
        check(self.flow in ("dis", "raft"), f"EvalConfig.flow {self.flow!r} is not dis or raft")

    def key(self, weights_id: str) -> str:
        blob = json.dumps(self.to_dict() | {"weights": weights_id}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def job_seed(cfg: EvalConfig, defence: str, attack: str, index: int) -> int:
    return (cfg.seed * 1_000_003 + zlib.crc32(f"{defence}/{attack}/{index}".encode())) % (2 ** 31)


def applicable(defence: str, attack: str) -> bool:
    if attack == "fullgrad":
        return defence in VIDEOPURE
    if attack == "eot_bpda":
        return defence in STOCHASTIC
    if attack in ("sparse", "gate"):
        return defence in ("none", "shield", "videopure")
    if defence == "shield":
        return attack in ("clean", "pgd", "sparse", "gate")
    return True


class Defences:
    """The defences over one set of mini-world models, built lazily and kept."""

    def __init__(self, world, cfg: EvalConfig):
        self.world, self.cfg = world, cfg
        self._cache: dict[str, Any] = {}

    def videopure(self, name: str):
        from vpure.runtime.purifier import VideoPure
        from vpure.runtime.flow import DISFlow
        from vpure.lab.demo import videopure_config
        from vpure.runtime.models.diffusion import eps_fn_of
        from vpure.runtime.models.raft import RAFTFlow

        base = videopure_config()
        cfg = {"videopure": base, "videopure_no_ti": base.replace(temporal_inversion=False),
               "videopure_no_sto": base.replace(sto=False), "videopure_no_vote": base.replace(voting="off")}[name]
        w = self.world
        flow = RAFTFlow(w.raft, pairs_per_call=16) if self.cfg.flow == "raft" else DISFlow("medium")
        return VideoPure(eps_fn_of(w.unet), w.encoder, w.decoder, w.recognizer, flow, cfg)

    def get(self, name: str, seed: int = 0):
        """(call(clip) -> DefenceResult, members(clip) -> list of purified clips)."""
        key = f"{name}/{seed}" if name in STOCHASTIC else name
        if key in self._cache:
            return self._cache[key]
        from vpure.lab import baselines as B
        from vpure.runtime.models.diffusion import eps_fn_of

        w = self.world
        if name in VIDEOPURE:
            vp = self.videopure(name)
            members = (lambda x, v=vp: v.purified_members(x)[-1:]) if vp.config.voting == "off" else vp.purified_members
            out = (vp, members)
        elif name == "shield":
            from vpure.lab.demo import build_shield

            shield, _ = build_shield(w, self.cfg.flow)
            out = (shield, None)
        elif name in ("none", "jpeg", "wd", "ts"):
            d = {"none": B.no_defence, "jpeg": B.jpeg_defence, "wd": B.wavelet_defence}.get(name)
            d = d(w.recognizer) if d else B.temporal_shuffle_defence(w.recognizer, seed)
            out = (d, lambda x, d=d: [d.transform(x) if d.transform else x])
        else:
            d = B.LatentDiffusionDefence(name, eps_fn_of(w.unet), w.encoder, w.decoder, w.recognizer, seed=seed)
            out = (d, lambda x, d=d: [d(x, keep_frames=True).frames])
        self._cache[key] = out
        return out


def run_attack(defences: Defences, defence: str, attack: str, clip: torch.Tensor, label: torch.Tensor, seed: int,
               trace: list[float]) -> torch.Tensor:
    from vpure.lab.attacks import BPDAOracle, EOTOracle, ModelOracle, TTOracle, apgd
    from vpure.lab.attacks import attack as pgd_attack
    from vpure.lab.attacks.apgd import dlr_loss
    from vpure.lab.attacks.fullgrad import FullGradOracle
    from vpure.lab.attacks.gate import GateOracle
    from vpure.lab.attacks.core import sparse_frames

    cfg, w = defences.cfg, defences.world
    kw = dict(eps=cfg.eps, step=cfg.step, iters=cfg.iters, seed=seed, trace=trace)
    if attack == "clean":
        return clip
    if attack == "pgd":
        return pgd_attack(ModelOracle(w.recognizer), clip, label, **kw)
    if attack == "sparse":
        frames = sparse_frames(clip.shape[2], cfg.sparse_k, seed)
        return pgd_attack(ModelOracle(w.recognizer), clip, label, frames=frames, **kw)
    if attack == "gate":
        return pgd_attack(GateOracle(w.recognizer, w.frame_classifier, clip), clip, label, **kw)
    if attack == "fullgrad":
        vp, _ = defences.get(defence)
        return pgd_attack(FullGradOracle(vp), clip, label, **(kw | {"iters": cfg.fullgrad_iters}))
    _, members = defences.get(defence, seed)
    bpda = BPDAOracle(members, w.recognizer)
    if attack == "pgd_bpda":
        return pgd_attack(bpda, clip, label, **kw)
    if attack == "pgd_l2":
        return pgd_attack(bpda, clip, label, **(kw | {"eps": cfg.eps_l2, "step": cfg.eps_l2 / 4, "norm": "l2"}))
    if attack == "eot_bpda":
        oracle = EOTOracle(lambda s: BPDAOracle(defences.get(defence, s)[1], w.recognizer), cfg.eot_samples, seed)
        return pgd_attack(oracle, clip, label, **kw)
    if attack == "tt":
        return pgd_attack(TTOracle(bpda), clip, label, **kw)
    if attack in ("apgd_ce", "apgd_dlr"):
        oracle = bpda if attack == "apgd_ce" else BPDAOracle(members, w.recognizer, dlr_loss)
        return apgd(oracle, clip, label, eps=cfg.eps, iters=cfg.iters, seed=seed, trace=trace)
    raise ConfigError(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}")


def run_job(defences: Defences, defence: str, attack: str, index: int) -> dict[str, Any]:
    """One (defence, attack, clip) job -> its JSON-able result."""
    from vpure.runtime.miniworld.dataset import make_clip

    cfg = defences.cfg
    smp = make_clip(cfg.split, index)
    clip, label = smp.clip[None], torch.tensor([smp.label])
    seed = job_seed(cfg, defence, attack, index)
    trace: list[float] = []
    adv = run_attack(defences, defence, attack, clip, label, seed, trace)
    call, _ = defences.get(defence, seed)
    out: dict[str, Any] = {"defence": defence, "attack": attack, "index": index, "true": smp.label,
                           "linf": round(float((adv - clip).abs().max()), 6), "trace": [round(t, 6) for t in trace]}
    if defence == "shield":
        rec = call(adv)[0]
        out |= {"label": rec.label, "route": rec.route, "alpha": rec.alpha, "votes": rec.votes}
    else:
        r = call(adv)
        out |= {"label": int(r.label[0]), "votes": r.member_labels[:, 0].tolist()}
    out["correct"] = out["label"] == smp.label
    return out


# -- orchestration --------------------------------------------------------------------------

def weights_digests(weights_dir=None, flow: str = "dis") -> dict[str, str]:
    """sha256 of each weights file an evaluation reads: every mini-world network, RAFT only
    when it is the flow provider (retraining an unused network keeps the cache valid)."""
    from vpure.runtime.artifacts import sha256_file
    from vpure.runtime.miniworld.models import COMPONENTS, weights_path

    return {c: sha256_file(weights_path(c, weights_dir)) for c in COMPONENTS if c != "raft" or flow == "raft"}


def weights_id(weights_dir=None, flow: str = "dis", digests: dict[str, str] | None = None) -> str:
    """Hash of the weights an evaluation reads (:func:`weights_digests`, or ``digests`` already
    computed): part of the cache key."""
    h = hashlib.sha256()
    for digest in (digests or weights_digests(weights_dir, flow)).values():
        h.update(digest.encode())
    return h.hexdigest()[:12]


def cache_dir(out_dir, cfg: EvalConfig, digests: dict[str, str]) -> Path:
    """Where the results of ``cfg`` on the weights with ``digests`` (:func:`weights_digests`)
    are cached under ``out_dir``: one folder per configuration and weights."""
    return Path(out_dir) / "cache" / cfg.key(weights_id(digests=digests))


def job_path(cache: Path, defence: str, attack: str, index: int) -> Path:
    return cache / defence / attack / f"{index:05d}.json"


_WORKER: dict[str, Any] = {}


def _worker_init(cfg_dict: dict, weights_dir, threads: int) -> None:
    from vpure.runtime.miniworld.models import load_world

    torch.set_num_threads(threads)
    _WORKER["defences"] = Defences(load_world(weights_dir), EvalConfig.from_dict(cfg_dict))


def _worker_job(job: tuple[str, str, int]) -> dict[str, Any]:
    return run_job(_WORKER["defences"], *job)


def evaluate(cfg: EvalConfig, defences: list[str], attacks: list[str], out_dir: Path, *, workers: int = 1,
             ray_address: str | None = None, weights_dir=None, progress: bool | None = None) -> Path:
    """Run every missing job into the cache; returns the cache folder."""
    from vpure.runtime.log import progress as bar

    unknown = sorted(set(defences) - set(DEFENCES)) + sorted(set(attacks) - set(ATTACKS))
    if unknown:
        raise ConfigError(f"unknown defence/attack {unknown}; defences: {', '.join(DEFENCES)}; "
                          f"attacks: {', '.join(ATTACKS)}")
    digests = weights_digests(weights_dir, cfg.flow)
    cache = cache_dir(out_dir, cfg, digests)
    cache.mkdir(parents=True, exist_ok=True)
    # what the cached results were measured with: the configuration and each network's weights
    record = cfg.to_dict() | {"weights": {c: d[:16] for c, d in digests.items()}}
    (cache / "config.json").write_text(json.dumps(record, indent=2, default=str))
    jobs = [(d, a, i) for d in defences for a in attacks if applicable(d, a) for i in range(cfg.clips)
            if not job_path(cache, d, a, i).is_file()]
    log.info("%d jobs to run (%s)", len(jobs), cache)

    def save(res: dict[str, Any]) -> None:
        p = job_path(cache, res["defence"], res["attack"], res["index"])
        atomic.write_text(p, json.dumps(res))

    if ray_address is not None:
        _run_ray(jobs, cfg, weights_dir, ray_address, save, progress)
    elif workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        threads = max(1, torch.get_num_threads() // workers)
        with ProcessPoolExecutor(workers, initializer=_worker_init,
                                 initargs=(cfg.to_dict(), weights_dir, threads)) as ex:
            for res in bar(ex.map(_worker_job, jobs), total=len(jobs), desc="vpure eval", enable=progress):
                save(res)
    else:
        from vpure.runtime.miniworld.models import load_world

        ds = Defences(load_world(weights_dir), cfg)
        for job in bar(jobs, total=len(jobs), desc="vpure eval", enable=progress):
            save(run_job(ds, *job))
    return cache


def _run_ray(jobs, cfg: EvalConfig, weights_dir, address: str, save: Callable, progress) -> None:
    from vpure.runtime.extras import require

    ray = require("ray", "lab", "vpure eval --ray")
    from vpure.runtime.log import progress as bar

    ray.init(address=None if address in ("", "local") else address, ignore_reinit_error=True,
             log_to_driver=False, include_dashboard=False)

    @ray.remote
    class Worker:
        def __init__(self):
            _worker_init(cfg.to_dict(), weights_dir, 1)

        def run(self, job):
            return _worker_job(job)

    n = max(1, int(ray.available_resources().get("CPU", 1)))
    pool = [Worker.remote() for _ in range(min(n, max(1, len(jobs))))]
    pending = [pool[k % len(pool)].run.remote(job) for k, job in enumerate(jobs)]
    for _ in bar(range(len(pending)), total=len(pending), desc="vpure eval (ray)", enable=progress):
        done, pending = ray.wait(pending, num_returns=1)
        save(ray.get(done[0]))


def load_results(cache: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(cache.glob("*/*/*.json"))]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))
