"""HarmAugDataModule: seed data + HarmAug synthetic data, teacher-labelled, ready for the student."""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler

from harmaug_pl.augment.chat_stage import length_order
from harmaug_pl.augment.generator import InstructionGenerator
from harmaug_pl.augment.pipeline import AugmentationPipeline
from harmaug_pl.augment.rank_sync import RankSync, all_gather_objects
from harmaug_pl.augment.responder import Responder
from harmaug_pl.categories import Category, check_taxonomy, row_targets
from harmaug_pl.data.encoding import encode_pairs, tokenize_rows
from harmaug_pl.data.loaders import DataSource, load_examples
from harmaug_pl.data.normalise import install_normaliser
from harmaug_pl.data.schema import GuardExample
from harmaug_pl.errors import ConfigError, DataError, DataUnavailable
from harmaug_pl.model_loading import load_tokenizer
from harmaug_pl.teachers.base import Teacher

log = logging.getLogger(__name__)

RESERVED_SET_NAMES = frozenset({"val", "mean", "test"})


class ExampleDataset(Dataset):
    """A list of guard examples; tokenisation happens in the collator (dynamic padding).

    ``indexed``: items are ``(position, example)``, so the collator can tell the model which rows a
    batch holds (eval batches come in length order, and reports want the rows' own order back).
    """

    def __init__(self, examples: list[GuardExample], indexed: bool = False) -> None:
        self.examples = examples
        self.indexed = indexed

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> GuardExample | tuple[int, GuardExample]:
        return (index, self.examples[index]) if self.indexed else self.examples[index]


class LengthSortedSampler(Sampler[int]):
    """Every row once, shortest first (ties keep their order).

    Eval batches are padded to their longest row: in file order the OpenAI held-out rows pad to
    154k tokens (104k real), in token-length order to 111k. Metrics do not depend on the order.
    """

    def __init__(self, lengths: Sequence[int]) -> None:
        self.order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)


class EpochSeededSampler(WeightedRandomSampler):
    """Class-balanced draws whose order is a function of (seed, epoch), not of how the run got there.

    Lightning calls ``set_epoch`` before every epoch, so a fit resumed from a checkpoint draws the
    same batches as an uninterrupted fit (a generator seeded once would replay epoch 0's order).

    With ``length_group`` > 1, each run of ``length_group`` batches of draws is sorted by token
    length, cut into batches, and those batches are shuffled: the same rows, batched with rows of
    similar length. Training batches pad to their longest row; on the default pack random batches
    hold 1.76x the real tokens, groups of 8 batches 1.10x.
    """

    def __init__(
        self,
        weights: list[float],
        seed: int,
        lengths: Sequence[int] | None = None,
        batch_size: int = 1,
        length_group: int = 1,
    ) -> None:
        super().__init__(weights, num_samples=len(weights), replacement=True, generator=torch.Generator())
        if length_group > 1 and (lengths is None or len(lengths) != len(weights)):
            raise ValueError("length_group > 1 needs one token length per row")
        self.seed = seed
        self.lengths = lengths
        self.batch_size = batch_size
        self.length_group = length_group
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)

    def __iter__(self) -> Iterator[int]:
        drawn = list(super().__iter__())
        if self.length_group <= 1 or self.lengths is None:
            return iter(drawn)
        size, window = self.batch_size, self.batch_size * self.length_group
        grouped = [drawn[p] for p in length_order([self.lengths[i] for i in drawn], window)]
        order: list[int] = []
        for start in range(0, len(grouped), window):
            batches = [grouped[i : i + size] for i in range(start, min(start + window, len(grouped)), size)]
            for b in torch.randperm(len(batches), generator=self.generator).tolist():
                order.extend(batches[b])
        return iter(order)


class PairCollator:
    """Tokenise (prompt, response) as a text pair, prompt-only rows alone; pad to the batch's longest.

    The student therefore sees the response whenever there is one: guards that silently score only
    the prompt are a known failure of peer wrappers.
    """

    def __init__(self, tokenizer: Any, max_length: int, categories: Sequence[Category] = ()) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.categories = list(categories)

    def __call__(self, items: list[GuardExample] | list[tuple[int, GuardExample]]) -> dict[str, torch.Tensor]:
        positions = [item[0] for item in items] if items and isinstance(items[0], tuple) else None
        rows = [item[1] for item in items] if positions is not None else items
        batch = encode_pairs(
            self.tokenizer, [row.prompt for row in rows], [row.response for row in rows], self.max_length
        )
        batch["teacher_score"] = torch.tensor(
            [row.teacher_score if row.teacher_score is not None else float("nan") for row in rows]
        )
        batch["label"] = torch.tensor([row.label if row.label is not None else -1 for row in rows])
        if positions is not None:
            batch["row_index"] = torch.tensor(positions)
        if self.categories:
            self._add_categories(batch, rows)
        return dict(batch)

    def _add_categories(self, batch: Any, rows: Sequence[GuardExample]) -> None:
        """The category head's training signal (target, mask) and the human labels (-1: unknown)."""
        signal = [
            row_targets(self.categories, row.teacher_score, row.teacher_categories, row.category_labels)
            for row in rows
        ]
        batch["category_target"] = torch.tensor([targets for targets, _ in signal], dtype=torch.float32)
        batch["category_mask"] = torch.tensor([known for _, known in signal], dtype=torch.bool)
        batch["category_label"] = torch.tensor(
            [
                [(row.category_labels or {}).get(c.get("openai") or "", -1) for c in self.categories]
                for row in rows
            ],
            dtype=torch.long,
        )
        batch["category_teacher"] = torch.tensor(  # the teacher's P(unsafe) x P(code | unsafe); NaN: none
            [
                [
                    (row.teacher_score or 0.0) * row.teacher_categories[c["code"]]
                    if row.teacher_categories and c.get("code") in row.teacher_categories
                    else float("nan")
                    for c in self.categories
                ]
                for row in rows
            ],
            dtype=torch.float32,
        )


def stratified_group_split(
    rows: list[GuardExample], val_fraction: float, threshold: float, seed: int
) -> tuple[list[GuardExample], list[GuardExample]]:
    """Split by prompt group (an instruction and its responses stay together), stratified by label.

    A group's stratum is whether any of its rows is teacher-unsafe, so both splits keep the class mix
    and no synthetic instruction leaks from train into val through its response rows. A stratum of
    two or more groups gives each split at least one, so a small set still has both classes in val
    (AUPRC is undefined without positives).
    """
    groups: dict[str, list[GuardExample]] = defaultdict(list)
    for row in rows:
        groups[row.prompt].append(row)
    strata: dict[bool, list[str]] = defaultdict(list)
    for prompt, members in groups.items():
        strata[any((m.teacher_score or 0.0) > threshold for m in members)].append(prompt)
    rng = random.Random(seed)
    val_prompts: set[str] = set()
    for key in sorted(strata):
        prompts = strata[key]
        rng.shuffle(prompts)
        count = round(len(prompts) * val_fraction)
        if len(prompts) > 1:
            count = min(max(count, 1), len(prompts) - 1)
        val_prompts.update(prompts[:count])
    train = [r for r in rows if r.prompt not in val_prompts]
    val = [r for r in rows if r.prompt in val_prompts]
    return train, val


def replace_atomically(path: Path, chunks: Iterable[str]) -> None:
    """Write ``chunks`` to a temporary file of this writer's own, then rename it over ``path``.

    Readers never see a half-written file, and two runs sharing a data directory cannot truncate or
    rename each other's temporary file (one fixed temporary name made the second run crash).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.writelines(chunks)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class HarmAugDataModule(L.LightningDataModule):
    """Builds the HarmAug training set through a resumable cache, then serves it to the student.

    ``setup`` loads the seed data, runs generator -> responder -> teacher (sharded across ranks, a
    barrier between stages, every rank then reads the full set), splits train/val and tokenises
    with the student's tokenizer. ``augment: false`` gives the KD-only baseline on the same pack.
    ``normalise_text`` (default true) puts :mod:`harmaug_pl.data.normalise`'s rules (NFKC, invisible
    characters removed, over-long words split) into that tokenizer, so the guard folder and
    serving apply them too; false trains on the tokenizer as shipped (runs before this option).
    Eval sets are served as one val/test dataloader each, named by their key (as val dataloaders
    only with ``validate_on_eval_sets``: per-epoch curves, at the cost of scoring every eval row in
    every validation pass; without it the test pass scores them once). Their rows without a
    human label are left out (counted in ``eval_unlabelled``); with ``score_eval_with_teacher`` the
    teacher scores every remaining row through the same cache, so reports compare student and
    teacher on the same rows.

    Eval sets are read before the (long) augmentation, so one that cannot be reached stops the run
    before any generation (``unavailable_eval_sets: stop``, the default) or, with ``skip``, is
    left out with a warning on every rank alike and named in the report (``eval_skipped``).
    """

    def __init__(
        self,
        tokenizer: str,
        seed_data: DataSource,
        teacher: Teacher,
        generator: InstructionGenerator | None = None,
        responder: Responder | None = None,
        eval_sets: dict[str, DataSource] | None = None,
        data_dir: str = "runs/harmaug/data",
        augment: bool = True,
        num_instructions: int | None = None,
        val_fraction: float = 0.1,
        threshold: float = 0.5,
        split_seed: int = 42,
        balanced_sampling: bool = True,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        max_length: int = 512,
        num_workers: int = 0,
        trust_remote_code: bool = False,
        score_eval_with_teacher: bool = True,
        unavailable_eval_sets: Literal["stop", "skip"] = "stop",
        validate_on_eval_sets: bool = True,
        length_group: int = 1,
        categories: list[Category] | str | None = None,
        normalise_text: bool = True,
    ) -> None:
        super().__init__()
        if unavailable_eval_sets not in ("stop", "skip"):
            raise ConfigError(
                f"data.unavailable_eval_sets must be 'stop' or 'skip', got {unavailable_eval_sets!r}"
            )
        if augment and generator is None:
            raise ConfigError("data.augment is true but no data.generator is configured")
        if length_group < 1:
            raise ConfigError(f"data.length_group must be >= 1 (1: no grouping), got {length_group}")
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        # metric keys are "<set>/<metric>": these names would mix with the val split or the mean
        clashing = sorted(name for name in eval_sets or {} if name in RESERVED_SET_NAMES or "/" in name)
        if clashing:
            raise ConfigError(
                f"data.eval_sets: {clashing} cannot name an eval set: {sorted(RESERVED_SET_NAMES)} are the "
                "metric prefixes of the val split, the mean over eval sets and the test pass, and '/' "
                "separates a "
                "set's name from its metric; rename the set"
            )
        self.tokenizer_ref = tokenizer
        self.seed_data = seed_data
        self.eval_sources = dict(eval_sets or {})
        self.data_dir = Path(data_dir)
        self.augment = augment
        self.num_instructions = num_instructions
        self.val_fraction = val_fraction
        self.threshold = threshold
        self.split_seed = split_seed
        self.balanced_sampling = balanced_sampling
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.max_length = max_length
        self.num_workers = num_workers
        self.trust_remote_code = trust_remote_code
        self.score_eval_with_teacher = score_eval_with_teacher
        self.unavailable_eval_sets = unavailable_eval_sets
        self.validate_on_eval_sets = validate_on_eval_sets
        self.length_group = length_group
        self.normalise_text = normalise_text
        self.categories = check_taxonomy(categories, "data.categories") if categories else []
        self.pipeline = AugmentationPipeline(
            generator=generator if augment else None,
            responder=responder if augment else None,
            teacher=teacher,
            threshold=threshold,
            category_codes=[c["code"] for c in self.categories if c.get("code")],
        )
        self.augmentation_stats: dict[str, float | int] = {}
        self.train_rows: list[GuardExample] = []
        self.val_rows: list[GuardExample] = []
        self.eval_rows: dict[str, list[GuardExample]] = {}
        self.eval_unlabelled: dict[str, int] = {}
        self.eval_skipped: dict[str, str] = {}  # set name -> why it could not be loaded
        self._tokenizer: Any = None

    @property
    def eval_set_names(self) -> list[str]:
        return [name for name in self.eval_sources if name not in self.eval_skipped]

    @property
    def validation_eval_set_names(self) -> list[str]:
        """The eval sets scored in validation passes, after the val split (see ``validate_on_eval_sets``)."""
        return self.eval_set_names if self.validate_on_eval_sets else []

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_ref, trust_remote_code=self.trust_remote_code)
            if self._tokenizer.pad_token is None:
                raise ConfigError(
                    f"the student tokenizer {self.tokenizer_ref!r} has no pad token; pick a student whose "
                    "tokenizer defines one (encoders such as DeBERTa/BERT/MiniLM do)"
                )
            if self.normalise_text:  # saved with the guard folder, so serving repeats it
                install_normaliser(self._tokenizer)
        return self._tokenizer

    # -- building the set ---------------------------------------------------------------------
    def _rank_sync(self) -> RankSync:
        trainer = getattr(self, "trainer", None)
        return RankSync(trainer.global_rank, trainer.world_size) if trainer is not None else RankSync(0, 1)

    @contextmanager
    def _sharded_job(self) -> Iterator[RankSync]:
        """Ranks share the job stage by stage; if one rank fails, all fail at its next barrier with
        its message (instead of waiting for the process-group timeout); the LLMs are freed after."""
        sync = self._rank_sync()
        try:
            with sync.guard():
                yield sync
        finally:
            self.pipeline.close()

    def build(self) -> list[GuardExample]:
        """Run the augmentation pipeline through the cache and return every teacher-labelled row.

        A sharded job (:meth:`_sharded_job`): re-running after a rank failed recomputes only the rows
        that rank did not write. The LLMs are freed before this returns.
        """
        with self._sharded_job() as sync:
            seed = load_examples(self.seed_data, origin="seed")
            result = self.pipeline.run(
                seed.examples,
                self.data_dir / "cache",
                augment=self.augment,
                num_instructions=self.num_instructions,
                rank=sync.rank,
                world_size=sync.world_size,
                barrier=sync.barrier,
            )
            self.augmentation_stats = {
                **{f"seed_skipped_{k}": v for k, v in seed.skipped.items()},
                **result.stats,
            }
            if sync.rank == 0:
                self._write_snapshot(result.rows)
        return result.rows

    def _write_snapshot(self, rows: list[GuardExample]) -> None:
        """The assembled set and its statistics, for people to read (the cache is the source of truth)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        replace_atomically(
            self.data_dir / "augmented.jsonl",
            (json.dumps(row.to_dict(), ensure_ascii=False) + "\n" for row in rows),
        )
        replace_atomically(self.data_dir / "stats.json", [json.dumps(self.augmentation_stats, indent=2)])

    def setup(self, stage: str) -> None:
        sets = None if self.eval_rows else self._read_eval_sets()  # before hours of augmentation
        if stage in ("fit", "validate") and not self.train_rows:
            rows = self.build()
            self.train_rows, self.val_rows = stratified_group_split(
                rows, self.val_fraction, self.threshold, self.split_seed
            )
            log.info("train rows: %d, val rows: %d", len(self.train_rows), len(self.val_rows))
        if sets is not None:
            self.eval_rows = self._label_eval_sets(sets)

    def _read_eval_sets(self) -> dict[str, list[GuardExample]]:
        """Each reachable eval set's human-labelled rows; unreachable ones stop the run or are skipped.

        Every rank reads; a set skipped on any rank is skipped on all, so every rank serves the
        same dataloaders.
        """
        sets: dict[str, list[GuardExample]] = {}
        unavailable: dict[str, str] = {}
        with self._rank_sync().guard():  # a rank that fails here stops the others at once
            for name, source in self.eval_sources.items():
                try:
                    rows = load_examples(source, origin="eval").examples
                except DataUnavailable as err:
                    if self.unavailable_eval_sets == "stop":
                        raise DataUnavailable(
                            f"eval set {name!r}: {err}. To train without it, set "
                            "data.init_args.unavailable_eval_sets: skip"
                        ) from err
                    unavailable[name] = str(err)
                    continue
                sets[name] = [row for row in rows if row.label is not None]
                self.eval_unlabelled[name] = len(rows) - len(sets[name])
                if self.eval_unlabelled[name]:
                    log.info(
                        "eval set %r: %d rows without a label left out", name, self.eval_unlabelled[name]
                    )
                if not sets[name]:
                    raise DataError(f"eval set {name!r} ({source.display}): no row has a label")
        for part in all_gather_objects(unavailable):  # every rank passed the guard's barrier
            for name, reason in part.items():
                unavailable.setdefault(name, reason)
        for name, reason in unavailable.items():
            log.warning("eval set %r skipped (data.unavailable_eval_sets: skip): %s", name, reason)
            sets.pop(name, None)
        self.eval_skipped = unavailable
        return sets

    def _label_eval_sets(self, sets: dict[str, list[GuardExample]]) -> dict[str, list[GuardExample]]:
        """The eval rows teacher-scored (one teacher pass over all sets, cached), unless switched off."""
        if not self.score_eval_with_teacher or not sets:
            return sets
        flat = [row for rows in sets.values() for row in rows]
        with self._sharded_job() as sync:
            scored = self.pipeline.label(
                flat,
                self.data_dir / "cache",
                stage="label_eval",
                rank=sync.rank,
                world_size=sync.world_size,
                barrier=sync.barrier,
            )
        start = 0
        for name, rows in sets.items():
            sets[name], start = scored[start : start + len(rows)], start + len(rows)
        return sets

    # -- resuming ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The random generators' states, saved in every checkpoint (Lightning does not save them).

        Restored by ``load_state_dict``, a fit resumed with ``--ckpt_path`` draws the same dropout
        masks and shuffles as an uninterrupted one. Tensors and tuples of ints only, so the
        checkpoint still loads with ``weights_only=True``.
        """
        state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return {"rng": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rng = state_dict.get("rng")
        if rng is None:  # a checkpoint written before generator states were saved
            return
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])

    # -- loaders ------------------------------------------------------------------------------
    def _loader(
        self, rows: list[GuardExample], batch_size: int, indexed: bool = False, **kwargs: Any
    ) -> DataLoader:
        return DataLoader(
            ExampleDataset(rows, indexed=indexed),
            batch_size=batch_size,
            collate_fn=PairCollator(self.tokenizer, self.max_length, self.categories),
            num_workers=self.num_workers,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        if not self.train_rows:
            raise ConfigError("no training rows: the seed data is empty after validation")
        if not self.balanced_sampling:
            return self._loader(self.train_rows, self.batch_size, shuffle=True)
        hard = [int((row.teacher_score or 0.0) > self.threshold) for row in self.train_rows]
        counts = [hard.count(0), hard.count(1)]
        weights = [1.0 / counts[h] for h in hard]
        lengths = self._token_lengths(self.train_rows) if self.length_group > 1 else None
        sampler = EpochSeededSampler(weights, self.split_seed, lengths, self.batch_size, self.length_group)
        return self._loader(self.train_rows, self.batch_size, sampler=sampler)

    def _token_lengths(self, rows: list[GuardExample]) -> list[int]:
        """Each row's token count as the student sees it (after truncation to ``max_length``)."""
        features, _ = tokenize_rows(
            self.tokenizer, [row.prompt for row in rows], [row.response for row in rows], self.max_length
        )
        return [len(feature["input_ids"]) for feature in features]

    def _eval_loader(self, rows: list[GuardExample]) -> DataLoader:
        """Batches of similar token length (see :class:`LengthSortedSampler`); each batch names its rows."""
        sampler = LengthSortedSampler(self._token_lengths(rows))
        return self._loader(rows, self.eval_batch_size, indexed=True, sampler=sampler)

    def val_dataloader(self) -> list[DataLoader]:
        sets = [self.val_rows, *(self.eval_rows[name] for name in self.validation_eval_set_names)]
        return [self._eval_loader(rows) for rows in sets]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(self.eval_rows[name]) for name in self.eval_set_names]

    def predict_dataloader(self) -> list[DataLoader]:
        """In the rows' own order: predictions line up with the eval files."""
        return [self._loader(self.eval_rows[name], self.eval_batch_size) for name in self.eval_set_names]
