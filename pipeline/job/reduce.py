"""The reduce stage: staged units assembled into the final checkpoint, in an order fixed by the plan alone.

Units arrive in any order; a shard is written as soon as every unit it holds is staged. A
shard holds its layers one after another, each unit's bytes as the runs its worker staged, so
the store itself copies those runs into place (S3 UploadPartCopy, a local copy_file_range) and the
reducer sends only the header and the little S3's 5 MiB part minimum makes it top up. Index,
sidecar, config, assets (licence files among them) and the model card follow the shards, and
the manifest comes last.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Iterator
from ..architecture import output_problem
from ..forward_check import ForwardCheck, check_forward
from ..io.hf_names import INDEX_NAME
from ..io.safetensors_io import PlannedTensor, aligned_order, grouped_order, header_bytes, write_stream
from ..io.multipart import MIN_PART
from ..io.storage import Location
from ..output.card import card_bytes, source_licence
from ..output.layout import CARD_NAME, SIDECAR_NAME, compressed_tensors_config, quantization_config, quantized_leaf
from ..output.manifest import MANIFEST_NAME, FileRecord, build_manifest, encode_manifest
from .plan import Plan
from .unit import UnitResult


class AssemblyError(OSError):
    """The store did not assemble a shard from the staged units as asked."""


class UnloadableOutput(ValueError):
    """The assembled output would not load into its model; nothing after the shards is written."""


def check_plan(plan: Plan, leaves: dict[str, tuple[int, int]] | None = None) -> ForwardCheck:
    """Raise ``UnloadableOutput`` unless the output the plan lays out, with ``leaves`` quantized (leaf
    -> [out, in]; by default the planned ones), loads into its model and runs its forward pass. The
    driver runs it once the plan is made, before any unit is quantized; the reducer again only if the
    units quantized other leaves. Neither reads a tensor's data."""
    names = [o.name for u in plan.units for o in u.outputs]
    if leaves is None:
        leaves = {t.leaf: (t.shape[1], t.shape[0]) if t.transpose else t.shape for t in plan.quantized}
    part_of = {part: t.leaf for t in plan.quantized for part, _ in t.parts}  # an expert's checkpoint tensors

    def leaf_of(name: str) -> str:
        leaf = quantized_leaf(name)
        return part_of.get(leaf, leaf)

    problem = output_problem(plan.model_config, names, list(leaves), plan.unwritten_buffers, leaf_of)
    if problem is not None:
        raise UnloadableOutput(f"{plan.source.spec}: the output would not load, so it is not committed: {problem}")
    check = check_forward(plan.model_config, leaves, plan.config)
    if check.problem is not None:
        raise UnloadableOutput(f"{plan.source.spec}: the output's forward pass fails in {check.problem} (on "
                               f"{check.how}), so it is not committed")
    return check


def model_leaves(entries) -> dict[str, tuple[int, int]]:
    """The model's quantized leaves and their [out, in] from sidecar entries ``(leaf, meta)``: an
    expert's checkpoint tensors (``of`` a stacked parameter's expert, ``rows`` of it) as that matrix."""
    leaves: dict[str, tuple[int, int]] = {}
    for leaf, meta in entries:
        n, k = meta["shape"]
        if "of" in meta:
            leaf, n = meta["of"], max(meta["rows"][1], leaves.get(meta["of"], (0, 0))[0])
        leaves[leaf] = (n, k)
    return leaves


class Assembler:
    """The reducer's state: staged units in, final files out, in the plan's order."""

    def __init__(self, plan: Plan, dest: Location, staging: Location) -> None:
        self.plan = plan
        self.dest = dest
        self.staging = staging
        self.results: dict[int, UnitResult] = {}
        self.files: list[FileRecord] = []
        self.next_shard = 0
        self.owner = {o.name: u.index for u in plan.units for o in u.outputs}
        self.assembly_s = 0.0
        self.sent_bytes = 0  # tensor and header bytes this process uploaded for the shards
        self.planned_leaves = sorted(t.leaf for t in plan.quantized)

    def add(self, result: UnitResult) -> list[str]:
        """Take a finished unit; returns the shards this completed and wrote."""
        self.results[result.index] = result
        written = []
        while self.next_shard < len(self.plan.shards) and all(
            i in self.results for i in self.plan.shards[self.next_shard]
        ):
            written.append(self._write_shard(self.next_shard))
            self.next_shard += 1
        return written

    def _runs(self, tensors: list[PlannedTensor], by_item_size: bool = False) -> list[tuple[int, int, int]]:
        """``(unit, start, nbytes)``: the staged bytes of ``tensors`` in order, one per contiguous run
        (``by_item_size``: cut where the item size changes too, as the workers' run digests are)."""
        runs: list[list[int]] = []
        size = 0
        for t in tensors:
            unit = self.owner[t.name]
            start, nbytes = self.results[unit].offsets[t.name]
            if not nbytes:
                continue
            same = not by_item_size or t.dtype.itemsize == size
            size = t.dtype.itemsize
            if runs and runs[-1][0] == unit and runs[-1][1] + runs[-1][2] == start and same:
                runs[-1][2] += nbytes
            else:
                runs.append([unit, start, nbytes])
        return [(u, s, n) for u, s, n in runs]

    def _layout(self, units: list[int]) -> tuple[list[PlannedTensor], bool]:
        """The shard's tensors in order, and whether each unit's runs lie in it as it staged them.

        Layer after layer (a split layer's units together; the small ones first), each layer's
        tensors largest item size first in task order: what the units staged, so a layer's bytes are one run per unit and item
        size, and the same whatever the split. Where that would leave a tensor unaligned, the whole
        shard is ordered by item size instead."""
        layers: list[list[PlannedTensor]] = []
        for i, u in enumerate(units):
            unit = self.plan.units[u]
            if i and unit.block and unit.block == self.plan.units[units[i - 1]].block:
                layers[-1] += unit.outputs
            else:
                layers.append(list(unit.outputs))
        # Layers too small to be an S3 part of their own go first, beside the header: the reducer
        # sends them with it in one part, instead of topping each up from its neighbour.
        layers.sort(key=lambda group: sum(t.nbytes for t in group) >= MIN_PART)
        grouped = grouped_order(layers)
        return (grouped, True) if grouped is not None else (aligned_order([t for g in layers for t in g]), False)

    def _write_shard(self, i: int) -> str:
        """Write shard ``i``. Laid out layer after layer where alignment allows (``_layout``), it is
        assembled by the store from the staged units, then read back and checked run by run
        against the sha256 each worker took of its bytes: a store that copies wrongly fails the
        job here instead of leaving a shard that verifies against its own wrong bytes. Otherwise,
        or with ``stream_assembly``, its bytes stream through here."""
        t0 = time.perf_counter()
        name = self.plan.shard_names[i]
        tensors, copyable = self._layout(self.plan.shards[i])
        head = header_bytes(tensors)
        runs = self._runs(tensors)
        if copyable and not self.dest.options.stream_assembly:
            try:
                self.sent_bytes += self.dest.compose(name, [head, *((self._staged(u), s, n) for u, s, n in runs)])
            except OSError as exc:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise AssemblyError(f"{self.dest.url}/{name}: the store could not assemble the shard from the staged "
                                    f"units ({reason}); a store without UploadPartCopy needs --stream-assembly") from None
            checked = self._runs(tensors, by_item_size=True)
            cuts = [len(head)]
            for _, _, n in checked[:-1]:
                cuts.append(cuts[-1] + n)
            whole, segments = self.dest.digests(name, cuts)
            if segments[0] != hashlib.sha256(head).hexdigest():
                raise AssemblyError(f"{self.dest.url}/{name}: the store assembled the shard's header wrongly; "
                                    "run again with --stream-assembly")
            for (u, s, n), got in zip(checked, segments[1:]):
                if got != self._run_digest(u, s, n):
                    raise AssemblyError(f"{self.dest.url}/{name}: the store assembled the shard's bytes of unit "
                                        f"{self.plan.units[u].name!r} wrongly; run again with --stream-assembly")
            size = len(head) + sum(n for _, _, n in runs)
        else:
            digest = hashlib.sha256()
            checked = self._runs(tensors, by_item_size=True)
            with self.dest.open_write(name, size=len(head) + sum(n for _, _, n in runs)) as f:
                size = write_stream(f, tensors, self._checked_chunks(checked), digest.update)
            whole = digest.hexdigest()
            self.sent_bytes += size
        self.files.append(FileRecord(name, size, whole))
        self.assembly_s += time.perf_counter() - t0
        return name

    def _checked_chunks(self, runs: list[tuple[int, int, int]]) -> Iterator[memoryview]:
        """The staged bytes of ``runs`` in windows (one window held at a time), each run checked
        against its worker's digest before its last window goes out, so a staged file changed
        since its worker wrote it fails the job instead of entering the shard."""
        window = self.staging.options.concurrency * self.staging.options.range_size
        for u, s, n in runs:
            digest = hashlib.sha256()
            for start in range(s, s + n, window):
                [chunk] = self.staging.read_ranges(self.results[u].staged, [(start, min(window, s + n - start))])
                digest.update(chunk)
                if start + window >= s + n and digest.hexdigest() != self._run_digest(u, s, n):
                    raise AssemblyError(f"{self.staging.url}/{self.results[u].staged}: the staged bytes of unit "
                                        f"{self.plan.units[u].name!r} no longer match its worker's digest")
                yield chunk

    def _run_digest(self, unit: int, start: int, nbytes: int) -> str:
        """The sha256 the worker took of this run of its staged file."""
        for s, n, digest in self.results[unit].runs:
            if (s, n) == (start, nbytes):
                return digest
        raise RuntimeError(f"unit {self.plan.units[unit].name!r}: no staged run at [{start}, {start + nbytes})")

    def _staged(self, unit: int) -> str:
        """The staged file of ``unit``, named relative to the destination (the staging area is inside it)."""
        return f"{self.staging.url[len(self.dest.url) + 1:]}/{self.results[unit].staged}"

    def _put(self, name: str, data: bytes) -> None:
        """Write one file after the shards and record it for the manifest."""
        self.dest.write_bytes(name, data)
        self.files.append(FileRecord.of(name, data))

    def _put_json(self, name: str, obj: object) -> None:
        self._put(name, (json.dumps(obj, indent=2) + "\n").encode())

    def finish(self, run_info: dict, run_key: str) -> dict:
        """Write everything after the shards; the manifest last. Returns the manifest."""
        plan = self.plan
        missing = [u.name for u in plan.units if u.index not in self.results]
        if missing or self.next_shard != len(plan.shards):
            raise RuntimeError(f"cannot finish: {len(missing)} units not done (first: {missing[:1]})")
        names = plan.shard_names
        weight_map = {o.name: names[s] for s, units in enumerate(plan.shards) for u in units for o in plan.units[u].outputs}
        leaves = model_leaves(meta for u in plan.units for meta in self.results[u.index].sidecar.items())
        if sorted(leaves) != self.planned_leaves:  # the driver checked the planned ones (check_plan)
            check_plan(plan, leaves)
        self._put_json(INDEX_NAME, {
            "metadata": {"total_size": plan.out_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        })
        # Sorted keys: a unit staged by an earlier run comes back from JSON, and must write the same bytes.
        sidecar = {leaf: {"meta": dict(sorted(meta.items()))}
                   for u in plan.units for leaf, meta in self.results[u.index].sidecar.items()}
        self._put_json(SIDECAR_NAME, sidecar)
        if plan.output_format == "compressed-tensors":
            block = compressed_tensors_config(plan.config, plan.not_converted)
        else:
            block = quantization_config(plan.config, plan.not_converted,
                                        quantized_experts=plan.structure()["expert_matrices_quantized"] > 0)
        self._put_json("config.json", {**plan.model_config, "quantization_config": block})
        for asset in plan.assets:
            self._put(asset, plan.source.read_bytes(asset))
        units = [self.results[u.index] for u in plan.units]

        def manifest() -> dict:
            return build_manifest(
                source={"spec": plan.source.spec, **plan.source.identity, "format": plan.source_format.describe()},
                quantization=_quantization(plan),
                files=self.files,
                tensors=[vars(s) for u in units for s in u.stats],
                units=[{"name": u.name, "worker": u.worker, "seconds": round(u.read_s + u.quantize_s + u.write_s, 3),
                        "peak_rss_bytes": u.peak_rss} for u in units],
                source_bytes=plan.in_bytes, tensor_bytes=plan.out_bytes, shards=len(plan.shards),
                tensors_copied=sum(len(u.tasks) for u in plan.units) - len(plan.quantized),
                timings={**run_info, "read_s": sum(u.read_s for u in units), "quantize_s": sum(u.quantize_s for u in units),
                         "stage_write_s": sum(u.write_s for u in units), "assembly_s": self.assembly_s,
                         "assembly_sent_bytes": self.sent_bytes},
                run_key=run_key, structure=plan.structure(),
            )

        # The card is rendered from the manifest as it stands without it (it never states the output's
        # total size, which would include the card itself).
        self._put(CARD_NAME, card_bytes(manifest(), licence=self._source_licence()))
        final = manifest()
        self.dest.write_bytes(MANIFEST_NAME, encode_manifest(final))
        return final

    def _source_licence(self) -> dict:
        """The licence fields of the source's own model card, where it has one."""
        source = self.plan.source
        try:
            return source_licence(source.read_bytes(CARD_NAME)) if source.exists(CARD_NAME) else {}
        except OSError:  # unreadable: the card only goes without the source's licence fields
            return {}


def _quantization(plan: Plan) -> dict:
    """The manifest's quantization block: the config, the output's format and what it leaves unconverted."""
    config = plan.config.to_dict()
    if plan.output_format == "compressed-tensors":
        config.pop("aux")  # group scales are stored in the model's dtype, zeros as packed integers
        return {**config, "quant_method": "compressed-tensors", "format": "compressed-tensors",
                "modules_not_converted": plan.not_converted}
    return {**config, "quant_method": "sinq", "format": "sinq", "modules_not_converted": plan.not_converted}
