"""The dataset part of a trained file's metadata: ss_datasets, ss_tag_frequency, ss_dataset_dirs, buckets.

Split from engine.networks.metadata, which assembles every key; the rules are sd-scripts' (spec §5.3).
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Iterable, Mapping
from typing import Any

from engine.config.schema import RunConfig
from engine.data.captions import folder_tag_frequency
from engine.data.records import DatasetPlan, SubsetPlan
from engine.data.scan import bucket_manager

__all__ = ["bucket_info", "dataset_metadata", "dataset_tag_frequency", "image_counts", "legacy_folder_keys"]


def dataset_metadata(datasets: list[DatasetPlan]) -> dict[str, str]:
    """ss_datasets, ss_tag_frequency and ss_dataset_dirs as sd-scripts writes them with a dataset config.

    Also ss_bucket_info when there is a single dataset (sd-scripts' legacy key, which describes one dataset);
    with several, each dataset's buckets are in its ss_datasets entry.
    """
    entries, tag_frequency, dataset_dirs = [], {}, {}
    for dataset in datasets:
        entries.append(_dataset_entry(dataset))
        for folder, counts in dataset_tag_frequency(dataset).items():
            tag_frequency.setdefault(folder, counts)  # a folder used by several datasets is counted once
        for subset in dataset.subsets:
            name = _dir_name(subset)
            if name is not None:
                dataset_dirs[_unique(name, dataset_dirs)] = _dir_info(subset)
    metadata = {"ss_datasets": json.dumps(entries), "ss_tag_frequency": json.dumps(tag_frequency),
                "ss_dataset_dirs": json.dumps(dataset_dirs)}
    if len(datasets) == 1:
        metadata["ss_bucket_info"] = json.dumps(bucket_info(datasets[0]))
    return metadata


def _dataset_entry(dataset: DatasetPlan) -> dict[str, Any]:
    params = dataset.params
    is_dreambooth = not any(subset.params.get("metadata_file") for subset in dataset.subsets)
    return {
        "is_dreambooth": is_dreambooth,
        "batch_size_per_device": params["batch_size"],
        "num_train_images": sum(_images_with_repeats(s) for s in dataset.subsets if not s.is_reg),
        "num_reg_images": sum(_images_with_repeats(s) for s in dataset.subsets if s.is_reg),
        "resolution": list(params["resolution"]),
        "enable_bucket": bool(params["enable_bucket"]),
        "min_bucket_reso": params["min_bucket_reso"],
        "max_bucket_reso": params["max_bucket_reso"],
        "tag_frequency": dataset_tag_frequency(dataset),
        "bucket_info": bucket_info(dataset),
        "resize_interpolation": _shared_value(dataset.subsets, "resize_interpolation"),
        "subsets": [_subset_entry(subset, is_dreambooth) for subset in dataset.subsets],
    }


def _images_with_repeats(subset: SubsetPlan) -> int:
    """Images times the subset's repeats, before regularization balancing changes per-image repeats."""
    return len(subset.records) * subset.params["num_repeats"]


def image_counts(datasets: Iterable[DatasetPlan]) -> tuple[int, int]:
    """(num_train_images, num_reg_images) for TrainingFacts, counted as sd-scripts does: images times repeats,
    regularization before balancing."""
    subsets = [subset for dataset in datasets for subset in dataset.subsets]
    return (sum(_images_with_repeats(s) for s in subsets if not s.is_reg),
            sum(_images_with_repeats(s) for s in subsets if s.is_reg))


def _shared_value(subsets: Iterable[SubsetPlan], key: str) -> Any:
    """A subset-level setting as one dataset value: the value every subset has, else None."""
    values = {subset.params.get(key) for subset in subsets}
    return values.pop() if len(values) == 1 else None


def _subset_entry(subset: SubsetPlan, is_dreambooth: bool) -> dict[str, Any]:
    params = subset.params
    entry: dict[str, Any] = {
        "img_count": len(subset.records),
        "num_repeats": params["num_repeats"],
        **{key: bool(params[key]) for key in ("color_aug", "flip_aug", "random_crop", "shuffle_caption")},
        **{key: params[key] for key in ("keep_tokens", "keep_tokens_separator", "secondary_separator")},
        "enable_wildcard": bool(params["enable_wildcard"]),
        **{key: params[key] for key in ("caption_prefix", "caption_suffix", "resize_interpolation")},
    }
    if params.get("image_dir"):
        entry["image_dir"] = _basename(params["image_dir"])
    if is_dreambooth:
        entry.update(class_tokens=params.get("class_tokens"), is_reg=subset.is_reg)
    else:
        entry["metadata_file"] = _basename(params["metadata_file"])
    return entry


def _dir_name(subset: SubsetPlan) -> str | None:
    """The name ss_dataset_dirs lists a subset under; regularization subsets are not listed."""
    if subset.params.get("metadata_file"):
        return _basename(subset.params["metadata_file"])
    if subset.is_reg or not subset.params.get("image_dir"):
        return None
    return _basename(subset.params["image_dir"])


def _dir_info(subset: SubsetPlan) -> dict[str, int]:
    return {"n_repeats": subset.params["num_repeats"], "img_count": len(subset.records)}


def _unique(name: str, taken: Mapping[str, Any]) -> str:
    """sd-scripts' naming of a folder listed twice: 'name', then 'name (2)', 'name (3)', ..."""
    candidate, number = name, 2
    while candidate in taken:
        candidate, number = f"{name} ({number})", number + 1
    return candidate


def _basename(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


def dataset_tag_frequency(dataset: DatasetPlan) -> dict[str, dict[str, int]]:
    """{folder: {tag: count}} over every scanned caption, regularization folders included, as sd-scripts counts.

    Fine-tuning subsets are listed under their metadata file; their count uses the whole caption (sd-scripts
    counts only the metadata's `tags` field, which the scan folds into the caption).
    """
    pairs = []
    for subset in dataset.subsets:
        folder = _basename(subset.params.get("metadata_file") or subset.params["image_dir"])
        pairs.extend((folder, record.caption) for record in subset.records)
        if not subset.records:
            pairs.append((folder, ""))  # sd-scripts lists a folder even when it holds no captions
    return folder_tag_frequency(pairs)


def bucket_info(dataset: DatasetPlan) -> dict[str, Any] | None:
    """sd-scripts' bucket_info: images per bucket including repeats, and the mean |aspect-ratio error|.

    Buckets are numbered by their position in the sorted bucket list (all predefined buckets, or the buckets in
    use with bucket_no_upscale), as sd-scripts numbers them. None when bucketing is off, as in sd-scripts.
    """
    if not dataset.params["enable_bucket"]:
        return None
    used = [record for subset in dataset.subsets for record in subset.records if record.num_repeats > 0]
    order = bucket_manager(dataset.params).buckets or sorted({record.bucket for record in used})
    counts: dict[tuple[int, int], int] = {}
    for record in used:
        counts[record.bucket] = counts.get(record.bucket, 0) + record.num_repeats
    buckets = {index: {"resolution": list(size), "count": counts[size]}
               for index, size in enumerate(order) if counts.get(size)}
    errors = [abs(r.bucket[0] / r.bucket[1] - r.size[0] / r.size[1]) for r in used]
    return {"buckets": buckets, "mean_img_ar_error": statistics.fmean(errors) if errors else 0}


def legacy_folder_keys(config: RunConfig, datasets: list[DatasetPlan]) -> dict[str, Any]:
    """The keys sd-scripts writes instead of ss_datasets for train_data_dir/reg_data_dir runs (one dataset)."""
    general = config.dataset.general
    dataset = datasets[0] if datasets else None
    reg_dirs = {_basename(s.params["image_dir"]): _dir_info(s) for s in (dataset.subsets if dataset else [])
                if s.is_reg}
    return {
        "ss_batch_size_per_device": general.batch_size,
        "ss_total_batch_size": general.batch_size * config.launch.num_processes
        * config.training.gradient_accumulation_steps,
        "ss_resolution": tuple(general.resolution),
        **{f"ss_{key}": bool(getattr(general, key)) for key in (
            "color_aug", "flip_aug", "random_crop", "shuffle_caption", "enable_bucket", "bucket_no_upscale")},
        "ss_min_bucket_reso": general.min_bucket_reso,
        "ss_max_bucket_reso": general.max_bucket_reso,
        "ss_keep_tokens": general.keep_tokens,
        "ss_reg_dataset_dirs": json.dumps(reg_dirs),
    }
