"""Edit requests from the public knowledge-editing datasets (ZsRE, CounterFact, MQuAKE).

What each dataset's fields are, named for what they are (the metrics rely on it):

* ``counterfact`` (the MEND-format split): ``rephrase_prompt`` is, for about 83 % of the records
  checked against the ROME sample, one of the record's *generation prompts* ("Toko Yasuda is
  incredible at"), not a paraphrase; it is kept in ``extra["generation_prompts"]`` and never
  used as a paraphrase. ``rephrases`` holds real paraphrases only where the case is also in the
  ROME-format sample. Its locality prompt is a neighbourhood prompt.
* ``counterfact-rome``: the 500 ROME-format records, with 2 real paraphrases and 10 neighbourhood
  prompts each (``extra["mend_split"]`` says which MEND split holds the case: 216 of them are in
  ``train``, which meta-trained editors may have seen).
* ``zsre``: real rephrases; locality split into ``same_subject`` probes (KnowEdit) and
  ``unrelated`` Natural Questions items. Its ``train`` split is the 1,000-record training
  sample, for meta-training only.

Users bring their own copies of the files; the folder is a setting (``FACTKEEPER_DATA_DIR``, else
``../shared/data`` next to the repository). Each loader reads the upstream record format
documented in ``shared/data/README.md`` and returns ``EditRequest``s in a fixed order with stable
ids (dataset + case id or index), so a benchmark with ``--edits 1000`` always edits the same
facts. The train part (for meta-trained editors) never overlaps the evaluation part.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from editing.errors import FactkeeperError
from editing.requests import EditRequest, LocalityProbe, MultiHopQuestion

log = logging.getLogger(__name__)

DATA_DIR_ENV = "FACTKEEPER_DATA_DIR"

DatasetName = Literal["zsre", "counterfact", "counterfact-rome", "mquake"]
Split = Literal["train", "val", "eval"]
DATASETS: tuple[str, ...] = ("zsre", "counterfact", "counterfact-rome", "mquake")
SPLITS: tuple[str, ...] = ("train", "val", "eval")

# File names inside the data folder (the layout of shared/data).
CF_MEND = {
    "train": "counterfact/counterfact_mend_train.json",
    "val": "counterfact/counterfact_mend_val.json",
    "eval": "counterfact/counterfact_mend_edit.json",
}
CF_ROME_SAMPLE = "counterfact/counterfact_rome_sample500_seed42.json"
ZSRE_KNOWEDIT = "zsre/zsre_knowedit_test_all.json"
ZSRE_MEM_FIRST300 = "zsre/zsre_mem_eval_first300.json"
ZSRE_TRAIN_SAMPLE = "zsre/zsre_mend_train_sample1k.json"
MQUAKE_HARD = "mquake/MQuAKE-hard-dev60.json"


class DatasetError(FactkeeperError):
    """A data file is missing, malformed, or a split does not exist offline."""


def default_data_dir() -> Path:
    """``$FACTKEEPER_DATA_DIR``, else ``../shared/data`` beside the repository when it exists."""
    raw = os.environ.get(DATA_DIR_ENV)
    if raw:
        return Path(raw).expanduser()
    beside_repo = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if beside_repo.is_dir():
        return beside_repo
    raise DatasetError(
        f"no data folder: set {DATA_DIR_ENV} to a folder laid out like shared/data "
        f"(counterfact/, zsre/, mquake/; see shared/data/README.md), or pass data_dir"
    )


def load_dataset(
    name: DatasetName,
    split: Split,
    data_dir: Path | None = None,
    limit: int | None = None,
) -> list[EditRequest]:
    """The requests of one dataset split, in a fixed order.

    Args:
        name: ``zsre``, ``counterfact`` or ``mquake``.
        split: ``eval`` is the evaluation stream of every dataset; ``train`` and ``val`` exist
            for CounterFact (the MEND-format files), ``train`` for ZsRE (meta-training only).
        data_dir: folder laid out like ``shared/data``; default ``default_data_dir()``.
        limit: keep only the first ``limit`` requests.

    Returns:
        The requests; ``request_id``s are stable across runs and machines.
    """
    if name not in _LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if limit is not None and limit < 0:
        raise ValueError("limit must be >= 0")
    folder = data_dir if data_dir is not None else default_data_dir()
    requests = _LOADERS[name](folder, split)
    if limit is not None:
        requests = requests[:limit]
    log.info("dataset loaded", extra={"dataset": name, "split": split, "n": len(requests)})
    return requests


# --- CounterFact -------------------------------------------------------------------------------


def load_counterfact(data_dir: Path, split: Split) -> list[EditRequest]:
    """MEND-format CounterFact, enriched from the ROME-format sample where a case is in it.

    A MEND record has one "rephrase" (mostly a generation prompt, see the module docstring) and
    one neighbourhood prompt. For the cases that are also in the 500-record ROME sample, the
    request also gets the two real paraphrases, all ten neighbourhood prompts and the record's
    generation prompts.
    """
    records = _read_json(data_dir, CF_MEND[split])
    rome = _rome_sample_by_case(data_dir)
    requests = []
    for rec in records:
        case_id = int(rec["case_id"])
        rephrases: list[str] = []
        generation = [rec["rephrase_prompt"]]
        locality = [LocalityProbe(rec["locality_prompt"], rec["locality_ground_truth"])]
        extra: dict[str, object] = {"case_id": case_id, "source": "counterfact_mend"}
        if case_id in rome:
            full = rome[case_id]
            rephrases += full["paraphrase_prompts"]
            true = full["requested_rewrite"]["target_true"]["str"]
            locality += [LocalityProbe(p, true) for p in full["neighborhood_prompts"]]
            generation += full["generation_prompts"]
            extra["source"] = "counterfact_mend+rome"
        extra["generation_prompts"] = tuple(x for x in dict.fromkeys(generation) if x)
        requests.append(
            EditRequest(
                request_id=f"counterfact-{case_id}",
                prompt=rec["prompt"],
                subject=rec["subject"],
                target_new=rec["target_new"],
                target_true=rec["ground_truth"],
                rephrases=_unique(rephrases),
                locality=_unique(locality),
                extra=extra,
            )
        )
    return requests


def load_counterfact_rome(data_dir: Path | None = None, split: Split = "eval") -> list[EditRequest]:
    """The 500-record ROME-format sample on its own (real paraphrases, ten neighbours each).

    Only ``eval`` exists: the sample is the whole stream, in sample order. Each request says in
    ``extra["mend_split"]`` which MEND split holds its case, so a benchmark can report the cases
    a meta-trained editor cannot have seen (those outside ``train``) apart.
    """
    if split != "eval":
        raise DatasetError("counterfact-rome has only an eval split (the 500-record ROME sample)")
    folder = data_dir if data_dir is not None else default_data_dir()
    mend_split = _mend_split_by_case(folder)
    requests = []
    for rec in _read_json(folder, CF_ROME_SAMPLE):
        rw = rec["requested_rewrite"]
        true = rw["target_true"]["str"]
        requests.append(
            EditRequest(
                request_id=f"counterfact-{rec['case_id']}",
                prompt=rw["prompt"].format(rw["subject"]),
                subject=rw["subject"],
                target_new=rw["target_new"]["str"],
                target_true=true,
                rephrases=_unique(rec["paraphrase_prompts"]),
                locality=_unique(LocalityProbe(p, true) for p in rec["neighborhood_prompts"]),
                extra={
                    "case_id": int(rec["case_id"]),
                    "source": "counterfact_rome",
                    "mend_split": mend_split.get(int(rec["case_id"])),
                    "generation_prompts": tuple(dict.fromkeys(rec["generation_prompts"])),
                },
            )
        )
    return requests


def _mend_split_by_case(data_dir: Path) -> dict[int, str]:
    """Which MEND-format split (train, val, eval) holds each CounterFact case."""
    out: dict[int, str] = {}
    for split, relative in CF_MEND.items():
        if (data_dir / relative).is_file():
            out.update((int(r["case_id"]), split) for r in _read_json(data_dir, relative))
    return out


def _rome_sample_by_case(data_dir: Path) -> dict[int, dict[str, Any]]:
    if not (data_dir / CF_ROME_SAMPLE).is_file():
        log.info("no ROME-format CounterFact sample in %s; MEND records only", data_dir)
        return {}
    return {int(r["case_id"]): r for r in _read_json(data_dir, CF_ROME_SAMPLE)}


# --- ZsRE --------------------------------------------------------------------------------------


def load_zsre(data_dir: Path, split: Split) -> list[EditRequest]:
    """KnowEdit's ZsRE test split, then the MEMIT ``first300`` records it does not contain.

    The two files share records (matched on ``cond``); a shared record is kept once, in
    KnowEdit's position, and gains the Natural Questions locality probe only ``first300`` has.
    KnowEdit's probes ask about the same subject (``same_subject``); the NQ items are
    ``unrelated``. ``train`` is the 1,000-record training sample (meta-training only).
    """
    if split == "train":
        return _zsre_mend_records(
            list(enumerate(_read_json(data_dir, ZSRE_TRAIN_SAMPLE))), "zsre-train", "zsre_train"
        )
    if split != "eval":
        raise DatasetError("ZsRE has train (the 1,000-record sample) and eval splits offline")
    knowedit = _read_json(data_dir, ZSRE_KNOWEDIT)
    mem = _read_json(data_dir, ZSRE_MEM_FIRST300)
    mem_by_cond = {r["cond"]: r for r in mem}
    seen: set[str] = set()
    requests = []
    for index, rec in enumerate(knowedit):
        if rec["cond"] in seen:
            continue
        seen.add(rec["cond"])
        locality = [
            LocalityProbe(p["prompt"], _first(p["ground_truth"]), "same_subject")
            for p in rec.get("locality", {}).get("Relation_Specificity", [])
        ]
        extra: dict[str, object] = {
            "source": "zsre_knowedit",
            "index": index,
            "cond": rec["cond"],
            "ground_truth": tuple(rec["ground_truth"]),
            "portability": rec.get("portability", {}),
        }
        if rec["cond"] in mem_by_cond:
            locality.append(_nq_probe(mem_by_cond[rec["cond"]]))
            extra["also_in"] = "zsre_mem_first300"
        requests.append(
            EditRequest(
                request_id=f"zsre-knowedit-{index}",
                prompt=rec["prompt"],
                subject=rec["subject"],
                target_new=rec["target_new"],
                target_true=_first(rec["ground_truth"]),
                rephrases=_unique([rec["rephrase_prompt"]]),
                locality=_unique(locality),
                extra=extra,
            )
        )
    rest = []
    for index, rec in enumerate(mem):
        if rec["cond"] not in seen:
            seen.add(rec["cond"])
            rest.append((index, rec))
    requests += _zsre_mend_records(rest, "zsre-mem", "zsre_mem_first300")
    return requests


def _zsre_mend_records(
    records: Sequence[tuple[int, dict[str, Any]]], prefix: str, source: str
) -> list[EditRequest]:
    """Requests from (index in file, record) of MEND/MEMIT-format zsRE (``src``, ``alt``, ...).

    Records with an empty new answer (two upstream ones) are skipped, every time alike.
    """
    requests, skipped = [], 0
    for index, rec in records:
        if not rec["alt"].strip():
            skipped += 1
            continue
        requests.append(
            EditRequest(
                request_id=f"{prefix}-{index}",
                prompt=rec["src"],
                subject=rec["subject"],
                target_new=rec["alt"],
                target_true=_first(rec["answers"]),
                rephrases=_unique([rec["rephrase"]]),
                locality=(_nq_probe(rec),),
                extra={
                    "source": source,
                    "index": index,
                    "cond": rec["cond"],
                    "ground_truth": tuple(rec["answers"]),
                },
            )
        )
    if skipped:
        log.info("skipped %d zsRE records with an empty new answer", skipped)
    return requests


def _nq_probe(rec: dict[str, Any]) -> LocalityProbe:
    # MEND/MEMIT feed the Natural Questions locality item as "nq question: ...?".
    return LocalityProbe(rec["loc"] + "?", rec["loc_ans"], "unrelated")


# --- MQuAKE ------------------------------------------------------------------------------------


def load_mquake(data_dir: Path, split: Split) -> list[EditRequest]:
    """One request per requested rewrite; a case's multi-hop questions ride on its last rewrite.

    So the multi-hop questions of a case are asked once, after all of its facts are edited. The
    rewrite's own single-hop ``question`` is its rephrase. MQuAKE has no locality prompts.
    """
    if split != "eval":
        raise DatasetError("MQuAKE has only an eval split offline (MQuAKE-hard dev60)")
    requests = []
    for rec in _read_json(data_dir, MQUAKE_HARD):
        case_id = int(rec["case_id"])
        rewrites = rec["requested_rewrite"]
        aliases = tuple(rec.get("new_answer_alias", ()))
        questions = tuple(MultiHopQuestion(q, rec["new_answer"], aliases) for q in rec["questions"])
        for hop, rw in enumerate(rewrites):
            last = hop == len(rewrites) - 1
            requests.append(
                EditRequest(
                    request_id=f"mquake-{case_id}-{hop}",
                    prompt=rw["prompt"].format(rw["subject"]),
                    subject=rw["subject"],
                    target_new=rw["target_new"]["str"],
                    target_true=rw["target_true"]["str"],
                    rephrases=_unique([rw["question"]]) if rw.get("question") else (),
                    multi_hop=questions if last else (),
                    extra={
                        "source": "mquake_hard",
                        "case_id": case_id,
                        "hop": hop,
                        "answer": rec["answer"],
                    },
                )
            )
    return requests


# --- helpers -----------------------------------------------------------------------------------

_LOADERS: dict[str, Callable[[Path, Split], list[EditRequest]]] = {
    "zsre": load_zsre,
    "counterfact": load_counterfact,
    "counterfact-rome": lambda folder, split: load_counterfact_rome(folder, split),
    "mquake": load_mquake,
}


def _read_json(data_dir: Path, relative: str) -> list[dict[str, Any]]:
    path = data_dir / relative
    if not path.is_file():
        raise DatasetError(
            f"{path} not found: the data folder must be laid out like shared/data "
            f"(set {DATA_DIR_ENV} or pass data_dir)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _first(value: str | Sequence[str]) -> str:
    return value if isinstance(value, str) else value[0]


def _unique(items: Any) -> tuple[Any, ...]:
    """Drop repeats and blanks, keep the first occurrence's order."""
    return tuple(x for x in dict.fromkeys(items) if (x.prompt if hasattr(x, "prompt") else x))
