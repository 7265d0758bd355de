"""The dataset doctor: the pre-flight check run before any GPU time is spent.

`run_doctor` scans the config's datasets, runs the deeper checks, and returns a `DoctorReport`: what was found
per subset, the bucket of every image, the per-epoch arithmetic and every finding with what to do. The JSON form
(`DoctorReport.to_dict`, `python -m engine doctor --json`) is stable: fields are only ever added. Its shape:

    {"version": 1, "ok": bool, "counts": {"error": n, "warning": n, "info": n},
     "findings": [{"severity", "code", "where", "message", "hint"}],
     "datasets": [{"path", "resolution": [w, h], "batch_size", "subsets": [{"path", "image_dir", "is_reg",
                   "images", "num_repeats", "samples_per_epoch", "unused_images", "validation_images"}],
                   "buckets": [{"bucket": [w, h], "images", "samples"}], "batches_per_epoch"}],
     "totals": {"train_images", "reg_images", "validation_images", "train_samples_per_epoch", "reg_samples_per_epoch",
                "batches_per_epoch", "steps_per_epoch", "epochs", "total_steps", "batch_size",
                "gradient_accumulation_steps", "num_processes"},
     "images": [{"path", "size": [w, h], "bucket": [w, h], "dataset", "subset", "is_reg", "num_repeats"}]}

"images" lists the trained images; `validation_images` counts those held out for the validation loss
(engine.data.validation_split), which never train.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config.schema import RunConfig
from engine.data.balance import RunLength, batches_per_epoch, run_length
from engine.data.doctor_checks import CHECKS
from engine.data.model_findings import model_findings
from engine.data.records import DatasetPlan, Finding, ScanResult
from engine.data.scan import scan_config

REPORT_VERSION = 1
_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


@dataclass
class DoctorReport:
    scan: ScanResult
    length: RunLength
    settings: dict[str, int]
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(finding.severity == "error" for finding in self.findings)

    def to_dict(self) -> dict[str, Any]:
        counts = Counter(finding.severity for finding in self.findings)
        return {
            "version": REPORT_VERSION,
            "ok": self.ok,
            "counts": {severity: counts.get(severity, 0) for severity in _SEVERITY_ORDER},
            "findings": [finding.to_dict() for finding in self.findings],
            "datasets": [_dataset_dict(dataset) for dataset in self.scan.datasets],
            "totals": self._totals(),
            "images": [_image_dict(record) for dataset in self.scan.datasets for subset in dataset.subsets
                       for record in subset.records],
        }

    def _totals(self) -> dict[str, int]:
        records = [r for d in self.scan.datasets for s in d.subsets for r in s.records]
        train = [r for r in records if not r.is_reg]
        reg = [r for r in records if r.is_reg]
        return {
            "train_images": len(train),
            "reg_images": len(reg),
            "validation_images": sum(len(s.validation) for d in self.scan.datasets for s in d.subsets),
            "train_samples_per_epoch": sum(r.num_repeats for r in train),
            "reg_samples_per_epoch": sum(r.num_repeats for r in reg),
            "batches_per_epoch": self.length.batches_per_epoch,
            "steps_per_epoch": self.length.steps_per_epoch,
            "epochs": self.length.epochs,
            "total_steps": self.length.total_steps,
            **self.settings,
        }


def _dataset_dict(dataset: DatasetPlan) -> dict[str, Any]:
    images, samples = Counter(), Counter()
    for subset in dataset.subsets:
        for record in subset.records:
            images[record.bucket] += 1
            samples[record.bucket] += record.num_repeats
    return {
        "path": dataset.path,
        "resolution": list(dataset.params["resolution"]),
        "batch_size": dataset.params["batch_size"],
        "subsets": [{
            "path": subset.path,
            "image_dir": subset.params.get("image_dir"),
            "is_reg": subset.is_reg,
            "images": len(subset.records),
            "num_repeats": subset.params["num_repeats"],
            "samples_per_epoch": sum(r.num_repeats for r in subset.records),
            "unused_images": sum(1 for r in subset.records if r.num_repeats == 0),
            "validation_images": len(subset.validation),
        } for subset in dataset.subsets],
        "buckets": [{"bucket": list(bucket), "images": images[bucket], "samples": samples[bucket]}
                    for bucket in sorted(images)],
        "batches_per_epoch": batches_per_epoch([r for s in dataset.subsets for r in s.records],
                                               dataset.params["batch_size"]),
    }


def _image_dict(record) -> dict[str, Any]:
    return {"path": str(record.path), "size": list(record.size), "bucket": list(record.bucket or ()),
            "dataset": record.dataset_index, "subset": record.subset_index, "is_reg": record.is_reg,
            "num_repeats": record.num_repeats}


def _latent_cache_findings(config: RunConfig, scan: ScanResult) -> list[Finding]:
    """Cache files on disk that the current settings would not reuse (only when latents are cached to disk)."""
    if not (config.training.cache_latents and config.training.cache_latents_to_disk):
        return []
    from engine.cache.latent_jobs import jobs_from_scan, stale_cache_findings

    family = None if config.model.model_family == "auto" else config.model.model_family
    return stale_cache_findings(jobs_from_scan(scan), family=family)


def run_doctor(config: RunConfig, base_dir: str | Path, *, quick: bool = False) -> DoctorReport:
    """Scan and check the datasets of `config` (paths relative to `base_dir`).

    Args:
        quick: skip the checks that read every file in full (decodes, duplicates).
    """
    scan = scan_config(config, base_dir, verify_images=not quick)
    findings = list(scan.findings)
    for name, check in CHECKS.items():
        if quick and name == "duplicates":
            continue
        findings += check(scan, config.model.max_token_length)
    findings += _latent_cache_findings(config, scan)
    findings += model_findings(config, base_dir)  # FLUX's and SD3's model files exist and fit (headers only)
    training = config.training
    batches = sum(batches_per_epoch([r for s in d.subsets for r in s.records], d.params["batch_size"])
                  for d in scan.datasets)
    length = run_length(batches, num_processes=config.launch.num_processes,
                        gradient_accumulation_steps=training.gradient_accumulation_steps,
                        max_train_epochs=training.max_train_epochs, max_train_steps=training.max_train_steps)
    settings = {"batch_size": max((d.params["batch_size"] for d in scan.datasets), default=0),
                "gradient_accumulation_steps": training.gradient_accumulation_steps,
                "num_processes": config.launch.num_processes}
    findings.sort(key=lambda finding: _SEVERITY_ORDER[finding.severity])
    return DoctorReport(scan, length, settings, findings)


def format_report(report: DoctorReport) -> str:
    """The report as text for a terminal: per-subset counts, the arithmetic, buckets, then the findings."""
    data = report.to_dict()
    lines = []
    for dataset in data["datasets"]:
        width, height = dataset["resolution"]
        lines.append(f"{dataset['path']}: {width}x{height}, batch {dataset['batch_size']}")
        for subset in dataset["subsets"]:
            kind = "reg  " if subset["is_reg"] else "train"
            unused = f" ({subset['unused_images']} unused)" if subset["unused_images"] else ""
            held = f" + {subset['validation_images']} held out for validation" if subset["validation_images"] else ""
            lines.append(f"  {kind} {subset['images']:>6} images x {subset['num_repeats']:>3} repeats = "
                         f"{subset['samples_per_epoch']:>7} samples/epoch{unused}{held}  {subset['image_dir']}")
        buckets = ", ".join(f"{b['bucket'][0]}x{b['bucket'][1]}: {b['images']}" for b in dataset["buckets"])
        lines.append(f"  buckets (images): {buckets or 'none'}")
    totals = data["totals"]
    lines.append(f"per epoch: {totals['train_samples_per_epoch']} training + {totals['reg_samples_per_epoch']} "
                 f"regularization samples -> {totals['batches_per_epoch']} batches -> {totals['steps_per_epoch']} "
                 f"steps ({totals['num_processes']} process(es), gradient accumulation "
                 f"{totals['gradient_accumulation_steps']}); {totals['epochs']} epochs = {totals['total_steps']} steps")
    if totals["validation_images"]:
        lines.append(f"validation: {totals['validation_images']} held-out image(s), never trained on")
    for finding in data["findings"]:
        hint = f"\n      -> {finding['hint']}" if finding["hint"] else ""
        lines.append(f"{finding['severity']}: {finding['where']}: {finding['message']}{hint}")
    counts = data["counts"]
    lines.append(f"{'ok' if data['ok'] else 'NOT READY'}: {counts['error']} error(s), {counts['warning']} "
                 f"warning(s), {counts['info']} note(s)")
    return "\n".join(lines)
