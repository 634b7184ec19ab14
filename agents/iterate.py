"""Iterative training (World Models sec. 5): collect with the current controller, retrain M, retrain C.

Round k (k = 2..rounds.count) appends `rounds.episodes` controller episodes to RUN/rollouts (`rounds.collect`: driven
by the kept controller, by the dream-best one, or half and half), encodes them, continues M's training on all latents
for another `rounds.mdn_steps` steps, and continues CMA-ES from its saved state (or, with `rounds.restart`, starts a
fresh search in the new dream) for another `rounds.generations` generations. A real-env check of each round's
controller (in the collection env `collect.env_id`, e.g. the fast CarRacing with the same physics) is written to
RUN/summary.json under `round_k`; the controller it checked is kept as `controller/round_k_best.safetensors`, and
`best.safetensors` becomes the round controller with the best of these full-length checks. Round 1's controller (the
one trained before the first iteration) gets the same check first and competes too. Completed rounds are recorded in
RUN/rounds.json and skipped on resume.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from agents.cma_search import cma_state_info
from agents.cmaes import train_controller
from agents.evaluate import RealEvaluator, summarize
from agents.stages import record_summary, stage_collect, stage_encode, stop_if_interrupted
from agents.wm_config import WorldModelConfig
from dreamlab.config import from_dict
from dreamlab.io import atomic_write_bytes, load_json, save_json
from generators.base import TrainConfig
from generators.trainer import train
from worlds.models import MDNRNN, MDNRNNConfig
from worlds.policies import controller_mdn, load_controller
from worlds.rollouts import read_manifest


def iterate_rounds(run_dir: Path, cfg: WorldModelConfig, *, progress: bool = True) -> list[dict[str, Any]]:
    run_dir = Path(run_dir)
    rounds = cfg.rounds
    state_p = run_dir / "rounds.json"
    state = load_json(state_p) if state_p.exists() else {}
    done: list[dict[str, Any]] = state.get("rounds", [])
    ctrl = run_dir / "controller" / "best.safetensors"

    def real_check(k: int) -> dict[str, Any]:
        """rounds.check_episodes (default selection.check_episodes) x evaluation.max_steps real steps of the current
        best.safetensors, on seeds disjoint from the final evaluation's; the checked controller is kept as
        round_k_best.safetensors."""
        theta = load_controller(ctrl)[0].numpy()
        seeds = [cfg.evaluation.seed + 500 + i for i in range(rounds.check_episodes or cfg.selection.check_episodes)]
        with RealEvaluator(run_dir, cfg.collect.env_id, cfg.workers, cfg.evaluation.max_steps,
                           controller_mdn(ctrl), cfg.parallel(run_dir)) as ev:
            real = summarize(ev.run([("controller", theta, s, False) for s in seeds], desc=f"round {k} real check",
                                    progress=progress))
        kept = ctrl.with_name(f"round_{k}_best.safetensors")
        atomic_write_bytes(kept, ctrl.read_bytes())
        return {"real_mean": real["mean"], "real_std": real["std"], "real_seeds": seeds, "controller": kept.name}

    def save() -> None:
        save_json(state_p, {**({"round_1": first} if first else {}), "rounds": done})

    # Round 1's controller (trained before any iteration) competes too: round 2's search overwrites best.safetensors,
    # and a restarted search can end below it (a medium-preset run's round 1 reached a 701 check, its restarted round
    # 2 started at 355, 118, -18).
    first: dict[str, Any] | None = state.get("round_1")
    if first is None and not done and rounds.count > 1 and ctrl.is_file():
        first = {"round": 1, "episodes_total": len(read_manifest(run_dir / "rollouts")["episodes"]), **real_check(1)}
        save()
        record_summary(run_dir, "round_1", first)
    for k in range(len(done) + 2, rounds.count + 1):
        n_now = len(read_manifest(run_dir / "rollouts")["episodes"])
        # "both": half the episodes with the kept controller, half with the dream-best one. The dream-best controller
        # is the one exploiting M's errors (e.g. full gas and hard steering that M thinks stays on the road); driving
        # it for real shows M exactly the states it got wrong, so the next M closes the loophole C found.
        dream_best = ctrl.with_name("best_dream.safetensors")
        sources = {"best": [ctrl], "dream": [dream_best], "both": [ctrl, dream_best]}[rounds.collect]
        collected = []  # recorded in this round's entry, so summary.json keeps the first collection's numbers
        for j, src in enumerate(sources):  # source j brings the total to its share of the round's episodes
            res = stage_collect(run_dir, cfg, resume=True, progress=progress,
                                episodes=n_now + rounds.episodes * (j + 1) // len(sources), policy="controller",
                                controller=str(src), seed=cfg.seed + 7919 * k + 104_729 * j, record=False)
            collected.append({"controller": src.name, **{kk: res.get(kk) for kk in ("new_episodes", "steps", "seconds",
                                                                                     "env_steps_per_s")}})
        encoded = stage_encode(run_dir, cfg, progress=progress, record=False)
        # continue M on all data: same model config, more steps
        folder = run_dir / "mdn"
        old = load_json(folder / "config.json")
        model = MDNRNN(from_dict(MDNRNNConfig, old["config"], what=str(folder / "config.json")))
        tc = from_dict(TrainConfig, {**old["train"], "steps": int(old["train"]["steps"]) + rounds.mdn_steps},
                       what=str(folder / "config.json"))
        mdn_res = stop_if_interrupted(train(model, tc, folder, resume=True, progress=progress))
        # continue CMA-ES in the new dream
        gens = int(cma_state_info(run_dir / "controller")["generation"]) + rounds.generations
        c_res = train_controller(run_dir, dataclasses.replace(cfg.search, generations=gens), cfg.selection, cfg.dream,
                                 seed=cfg.seed, workers=cfg.workers, env_id=cfg.collect.env_id, device=cfg.device,
                                 resume=True, progress=progress, reset_best=True, restart=rounds.restart,
                                 backend=cfg.parallel(run_dir))
        info = {"round": k, "episodes_total": n_now + rounds.episodes, "collect": collected,
                "encode_seconds": encoded.get("seconds"), "mdn_test_nll_per_step": mdn_res.get("test_nll_per_step"),
                "dream_best": c_res["best_dream_fitness"], **real_check(k)}
        if c_res.get("playoff"):
            info["playoff"] = {k2: c_res["playoff"][k2] for k2 in ("chosen_generation", "chosen_playoff_mean")}
        done.append(info)
        # The periodic checks inside CMA-ES pick a controller per round; these full-length checks pick among the
        # rounds (round 1 included): a later round's pick that drives worse does not replace an earlier one.
        top = max((r for r in (first, *done) if r and (ctrl.parent / r.get("controller", "")).is_file()),
                  key=lambda r: r["real_mean"])
        if top is not info:
            atomic_write_bytes(ctrl, (ctrl.parent / top["controller"]).read_bytes())
        info["kept_round"] = top["round"]
        save()
        record_summary(run_dir, f"round_{k}", info)
    return done
