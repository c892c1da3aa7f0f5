"""The training stages, in the order the run takes them, and why in that order.

Retrv-R1 starts from a pretrained Qwen2.5-VL; ours starts from random weights, so the order is:

1. `pretrain`: vision tower + LM learn to see (captioning every training image) and the coarse embedder learns
   to retrieve (InfoNCE). Afterwards the vision tower is frozen, as the paper freezes its encoder, and every
   image's tokens are computed once (what the runtime's token cache holds).
2. `sft_full`: SFT of the LM on the CoT with every candidate's FULL tokens in the prompt (no ICM). This is the
   teacher self-alignment needs: an LM that has never read a rerank prompt gives outputs that mean nothing.
3. `align`: ICM self-alignment. LM frozen; the ICM learns two tokens per candidate such that the LM's CoT
   distributions from the compressed prompt match those from the full prompt (KL).
4. `sft_icm`: SFT on the four-phase CoT with ICM prompts and details inspection (full tokens appended exactly as
   the runtime appends them), LM and ICM trained together.
5. `grpo`: Retrv-R1's GRPO with the curriculum reward, rollouts through the runtime's Reranker.

The LM is also the coarse embedder (the pack pools it), so every stage that trains the LM keeps the InfoNCE loss
on as well; otherwise reranking SFT would erode the first stage.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from retrv.runtime.rerank.budget import Budget
from retrv.train import losses
from retrv.train.cot import cot_events, ideal_text
from retrv.train.data import ImageBank, Split, TokenStore
from retrv.train.examples import (Sampler, Window, block_mask, build_windows, calibrate_noise, cand_item, embed_split,
                                  query_item)
from retrv.train.grpo import advantages, policy_loss, rollouts
from retrv.train.probe import VisionProbe, token_labels
from retrv.train.rewards import curriculum
from retrv.train.sequences import Item, SequenceBuilder

log = logging.getLogger(__name__)

WINDOW = 10  # candidates the reranker sees per query (one window): the synthetic pool per target is 8


@dataclass(frozen=True)
class StageConfig:
    steps: int
    lr: float
    batch: int  # captions, windows or GRPO queries per step
    embed_batch: int = 16  # InfoNCE queries per step (0: off)
    warmup: int = 20


@dataclass(frozen=True)
class Schedule:
    vision: StageConfig
    pretrain: StageConfig
    sft_full: StageConfig
    align: StageConfig
    sft_icm: StageConfig
    grpo: StageConfig
    hard_negatives: int = 2  # sampled per query per InfoNCE step
    exhaust_prob: float = 0.3  # SFT windows trained under a reduced inspection budget (0, 1 or 2)
    group: int = 4  # GRPO rollouts per query
    temperature: float = 1.0  # GRPO sampling
    inspect_order: str = "survivors"  # what phase 3 of the CoT inspects (`retrv.train.cot.plan_cot`)
    window_block: int = 0  # rank each training query among this many targets' pools (0: the whole split); see examples
    probe_position: bool = False  # the dense probe also asks each token for its object's position (see probe)

    def to_dict(self) -> dict:
        return asdict(self)


def lr_at(step: int, cfg: StageConfig) -> float:
    """Linear warm-up then cosine decay to 10%."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


class Trainer:
    def __init__(self, model, tokenizer, train: Split, val: Split, bank: ImageBank, schedule: Schedule,
                 seed: int, report=print) -> None:
        self.model, self.train, self.val, self.bank, self.s = model, train, val, bank, schedule
        self.sb = SequenceBuilder(model, tokenizer)
        self.seed, self.report = seed, report
        self.rng = random.Random(seed)
        self.store = TokenStore()
        self.history: dict[str, dict] = {}
        self._embed_sampler = Sampler(list(range(len(train.queries))), seed + 2)
        self.relevance = losses.RelevanceHead(model.cfg.text.hidden_size)  # training only, see losses.py

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _optimizer(self, params):
        return torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-3, betas=(0.9, 0.98), weight_decay=0.01)

    def _loop(self, name: str, cfg: StageConfig, params, step_fn) -> dict:
        params = [p for p in params if p.requires_grad]
        opt = self._optimizer(params)
        t0, sums, every = time.perf_counter(), {}, max(1, cfg.steps // 10)
        curve = []
        for step in range(cfg.steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            parts = step_fn(step)
            loss = sum(v for v in parts.values() if v.requires_grad)  # logged-only values carry no grad
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            if (step + 1) % every == 0 or step + 1 == cfg.steps:
                n = (step % every) + 1
                means = {k: v / n for k, v in sums.items()}
                curve.append({"step": step + 1, **{k: round(v, 4) for k, v in means.items()}})
                self.report(f"  [{name}] step {step + 1}/{cfg.steps} " +
                            " ".join(f"{k}={v:.3f}" for k, v in means.items()) +
                            f" ({time.perf_counter() - t0:.0f} s)")
                sums = {}
        out = {"steps": cfg.steps, "seconds": round(time.perf_counter() - t0, 1), "lr": cfg.lr, "batch": cfg.batch,
               "curve": curve}
        self.history[name] = out
        return out

    def _embed_step(self, n: int) -> torch.Tensor:
        """InfoNCE on n training queries once the vision tokens are cached."""
        qs, negs, _ = self._embed_batch(n)
        q_items = [query_item(self.train, q, self.store) for q in qs]
        return losses.info_nce(self.sb, q_items, [q.pos_cand_list[0] for q in qs], negs,
                               lambda k: cand_item(k, self.store))

    def _embed_batch(self, n: int) -> tuple[list, list[list[str]], list[str]]:
        """n training queries, their sampled hard negatives, and every image key the batch touches."""
        qs = [self.train.queries[i] for i in self._embed_sampler.take(n)]
        negs = losses.sample_negatives(qs, self.s.hard_negatives, self.rng)
        keys = [q.pos_cand_list[0] for q in qs] + [d for ns in negs for d in ns]
        keys += [self.train.query_image_key(q) for q in qs if q.query_img_path]
        return qs, negs, list(dict.fromkeys(keys))

    # -- 0. vision pretraining ----------------------------------------------------------------------------------------
    def pretrain_vision(self) -> dict:
        """The vision tower alone on the dense probe (`retrv.train.probe`): ~4x cheaper per image than a joint step,
        so the tower learns colours, shapes and details before the LM has to read them."""
        cfg = self.s.vision
        images = Sampler(sorted(self.train.scenes), self.seed + 1)
        self.probe = VisionProbe(self.model.cfg.text.hidden_size, self.s.probe_position)

        def step(i):
            keys = images.take(cfg.batch)
            labels = [token_labels(self.train.scenes[k].scene, self.bank.grids[k], position=self.s.probe_position)
                      for k in keys]
            tokens = torch.cat(self.bank.encode(self.model, keys))
            return {"probe": self.probe(tokens, torch.from_numpy(np.concatenate(labels)))}

        return self._loop("vision", cfg, list(self.model.visual.parameters()) + list(self.probe.parameters()), step)

    # -- 1. pretraining --------------------------------------------------------------------------------------------
    def pretrain(self) -> dict:
        """Every step: an InfoNCE batch, captioning of the images that batch touches, and the dense vision probe
        on all of them (the vision tower runs once per image for the three losses)."""
        cfg = self.s.pretrain
        grids = self.bank.grids

        def step(i):
            qs, negs, keys = self._embed_batch(cfg.embed_batch)
            tokens = dict(zip(keys, self.bank.encode(self.model, keys)))
            labels = [token_labels(self.train.scenes[k].scene, grids[k], position=self.s.probe_position) for k in keys]
            labels = torch.from_numpy(np.concatenate(labels))
            captioned = keys[:cfg.batch]
            parts = {"caption": losses.caption_loss(self.sb, [Item(None, tokens[k], grids[k]) for k in captioned],
                                                    [ideal_text(self.train.scenes[k].scene) for k in captioned])}
            q_items = [Item(q.query_txt) if not q.query_img_path else
                       Item(q.query_txt, tokens[self.train.query_image_key(q)], grids[self.train.query_image_key(q)])
                       for q in qs]
            parts["nce"] = losses.info_nce(self.sb, q_items, [q.pos_cand_list[0] for q in qs], negs,
                                           lambda k: Item(None, tokens[k], grids[k], k))
            parts["probe"] = probe(torch.cat([tokens[k] for k in keys]), labels)
            return parts

        probe = getattr(self, "probe", None) or VisionProbe(self.model.cfg.text.hidden_size, self.s.probe_position)
        out = self._loop("pretrain", cfg, list(self.model.parameters()) + list(probe.parameters()), step)
        self.freeze_vision()
        return out

    def freeze_vision(self) -> None:
        for p in self.model.visual.parameters():
            p.requires_grad_(False)
        t0 = time.perf_counter()
        for split in (self.train, self.val):
            self.store.fill(self.model, self.bank, sorted(split.scenes))
        self.report(f"  vision frozen; tokens of {len(self.store.tokens)} images cached "
                    f"({time.perf_counter() - t0:.0f} s)")

    # -- windows ---------------------------------------------------------------------------------------------------
    def windows(self, stage: str) -> list[Window]:
        """Fresh coarse rankings (the embedder keeps training), noise calibrated against validation."""
        t0 = time.perf_counter()
        tq, tc = embed_split(self.sb, self.train, self.store)
        vq, vc = embed_split(self.sb, self.val, self.store)
        mask = block_mask(self.train, self.s.window_block, self.seed)
        noise, train_top1, val_top1 = calibrate_noise((tq, tc, self.train), (vq, vc, self.val), mask)
        wins = build_windows(self.train, tq, tc, WINDOW, noise, self.seed + len(self.history), self.s.inspect_order,
                             mask)
        insp = np.mean([len(w.plan.inspect) for w in wins]) if wins else 0.0
        self.report(f"  [{stage}] coarse val R@1 {val_top1:.3f}; train windows with noise {noise}: top-1 "
                    f"{train_top1:.3f}, {len(wins)}/{len(self.train.queries)} contain the target, "
                    f"{insp:.2f} inspections per CoT ({time.perf_counter() - t0:.0f} s)")
        self.history.setdefault("windows", {})[stage] = {
            "val_coarse_r1": val_top1, "noise": noise, "train_top1": train_top1, "windows": len(wins),
            "inspections_per_cot": round(float(insp), 3)}
        return wins

    def _window_items(self, w: Window) -> tuple[Item, list[Item]]:
        return query_item(self.train, w.query, self.store), [cand_item(d, self.store) for d in w.dids]

    def _plain(self, w: Window) -> list[tuple]:
        """The CoT without phase 3: what a full-token prompt needs (everything is already in view)."""
        return cot_events(replace(w.plan, inspect=()))

    # -- 2. SFT with full tokens -----------------------------------------------------------------------------------
    def sft_full(self) -> dict:
        cfg = self.s.sft_full
        sampler = Sampler(self.windows("sft_full"), self.seed + 3)

        def step(i):
            seqs = []
            for w in sampler.take(cfg.batch):
                q, cs = self._window_items(w)
                seqs.append(self.sb.rerank(q, cs, None, self._plain(w)))
            parts = {"cot": losses.rerank_loss(self.sb, seqs)}
            if cfg.embed_batch:
                parts["nce"] = self._embed_step(cfg.embed_batch)
            return parts

        return self._loop("sft_full", cfg, self.model.parameters(), step)

    # -- 3. ICM self-alignment -------------------------------------------------------------------------------------
    def align(self) -> dict:
        cfg = self.s.align
        sampler = Sampler(self.windows("align"), self.seed + 4)
        frozen = [p for n, p in self.model.named_parameters() if not n.startswith("icm.") and p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)

        def step(i):
            teacher, student, icms, answers, keeps = [], [], [], [], []
            for w in sampler.take(cfg.batch):
                q, cs = self._window_items(w)
                events = self._plain(w)
                icms.append(losses.icm_tokens(self.sb, q, cs))
                answers.append(w.answer)
                keeps.append(w.plan.keep)
                teacher.append(self.sb.rerank(q, cs, None, events))
                student.append(self.sb.rerank(q, cs, icms[-1], events))
            return {"kl": losses.align_loss(self.sb, teacher, student), "rel": self.relevance(icms, answers, keeps)}

        try:
            return self._loop("align", cfg, list(self.model.icm.parameters()) + list(self.relevance.parameters()),
                              step)
        finally:
            for p in frozen:
                p.requires_grad_(True)

    # -- 4. SFT with ICM and details inspection --------------------------------------------------------------------
    def _budget(self) -> int | None:
        return self.rng.randrange(3) if self.rng.random() < self.s.exhaust_prob else Budget().inspect

    def sft_icm(self) -> dict:
        cfg = self.s.sft_icm
        sampler = Sampler(self.windows("sft_icm"), self.seed + 5)

        def step(i):
            seqs, icms, answers, keeps = [], [], [], []
            for w in sampler.take(cfg.batch):
                q, cs = self._window_items(w)
                icms.append(losses.icm_tokens(self.sb, q, cs))
                answers.append(w.answer)
                keeps.append(w.plan.keep)
                seqs.append(self.sb.rerank(q, cs, icms[-1], cot_events(w.plan, self._budget())))
            parts = {"cot": losses.rerank_loss(self.sb, seqs), "rel": self.relevance(icms, answers, keeps)}
            if cfg.embed_batch:
                parts["nce"] = self._embed_step(cfg.embed_batch)
            return parts

        return self._loop("sft_icm", cfg, list(self.model.parameters()) + list(self.relevance.parameters()), step)

    # -- validation ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, stage: str, inspect_budgets=(0, Budget().inspect), use_icm: bool = True) -> dict:
        """Greedy reranking of the validation queries' real coarse windows through the runtime's Reranker:
        R@1 of the coarse order and of the reranked order, per inspection budget (`use_icm=False`: full-token
        prompts, the teacher's mode)."""
        from retrv.export.torch_backend import TorchBackend
        from retrv.runtime.rerank.loop import Reranker
        from retrv.train.grpo import to_runtime

        t0 = time.perf_counter()
        vq, vc = embed_split(self.sb, self.val, self.store)
        top = np.argsort(-(vq @ vc.T), axis=1, kind="stable")[:, :WINDOW]
        table = self.model.language_model.embed_tokens.weight.detach().numpy()
        out = {"coarse_r1": 0.0}
        for budget in inspect_budgets:
            rr = Reranker(TorchBackend(self.model), self.sb.tok, self.model.cfg, table, use_icm=use_icm)
            hits, inspected, think = 0, 0, 0
            for q, row in zip(self.val.queries, top):
                dids = [self.val.dids[j] for j in row]
                q_in, c_in = to_runtime(query_item(self.val, q, self.store), [cand_item(d, self.store) for d in dids])
                res = rr.rerank(q_in, c_in, Budget(inspect=budget), window=WINDOW, stride=WINDOW)
                hits += dids[res.order[0]] == q.pos_cand_list[0]
                inspected += res.usage.inspect
                think += res.usage.think
            n = len(self.val.queries)
            out[f"rerank_r1_inspect{budget}"] = hits / n
            out[f"inspections_inspect{budget}"] = inspected / n
            out[f"think_tokens_inspect{budget}"] = think / n
        out["coarse_r1"] = float(np.mean([self.val.dids[row[0]] == q.pos_cand_list[0]
                                          for q, row in zip(self.val.queries, top)]))
        self.model.train()
        self.report(f"  [{stage}] val: coarse R@1 {out['coarse_r1']:.3f}; " + ", ".join(
            f"rerank R@1 {out[f'rerank_r1_inspect{b}']:.3f} ({out[f'inspections_inspect{b}']:.2f} insp, "
            f"{out[f'think_tokens_inspect{b}']:.0f} think) at inspect budget {b}" for b in inspect_budgets) +
            f" ({time.perf_counter() - t0:.0f} s)")
        out["use_icm"] = use_icm
        self.history.setdefault("validation", {})[stage] = out
        return out

    # -- 5. GRPO ---------------------------------------------------------------------------------------------------
    def grpo(self) -> dict:
        cfg, s = self.s.grpo, self.s
        sampler = Sampler(self.windows("grpo"), self.seed + 6)
        stats = []

        def step(i):
            lam = curriculum(i, max(1, cfg.steps - 1))
            batch, rewards = [], []
            for j, w in enumerate(sampler.take(cfg.batch)):
                q, cs = self._window_items(w)
                group = rollouts(self.sb, q, cs, w.answer, s.group, lam, s.temperature,
                                 seed=self.seed * 100003 + i * 1009 + j * 17, budget=Budget())
                adv = advantages([r.reward for r in group])
                batch += list(zip(group, adv.tolist()))
                rewards += group
            stats.append({"lambda": lam, "reward": float(np.mean([r.reward for r in rewards])),
                          "correct": float(np.mean([r.correct for r in rewards])),
                          "format": float(np.mean([r.format_ok for r in rewards])),
                          "inspected": float(np.mean([r.inspected for r in rewards]))})
            parts = {"pg": policy_loss(self.sb, batch, s.temperature)}
            if cfg.embed_batch:
                parts["nce"] = self._embed_step(cfg.embed_batch)
            parts["reward"] = torch.tensor(stats[-1]["reward"])  # logged, constant: no gradient
            return parts

        out = self._loop("grpo", cfg, self.model.parameters(), step)
        out["rollouts"] = stats
        return out
