"""Aspect-ratio bucketing matches sd-scripts (spec §2.1, §2.2) in both modes."""

import math

import pytest

from engine.data.buckets import (
    BucketAssignment,
    BucketManager,
    bucket_histogram,
    fixed_bucket,
    make_bucket_resolutions,
)

SD15_BUCKETS = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]


def spec_rule(width: int, height: int, low: int, high: int, step: int) -> list[tuple[int, int]]:
    """Spec §2.1 written out plainly, independently of the implementation."""
    area = width * height
    found = []
    square = math.floor(math.sqrt(area) / step) * step
    found.append((square, square))
    w = low
    while w <= high:
        h = min(high, math.floor((area // w) / step) * step)
        if h >= low:
            found += [(w, h), (h, w)]
        w += step
    return sorted(set(found))


def test_the_spec_worked_example_512():
    assert make_bucket_resolutions((512, 512)) == SD15_BUCKETS
    assert BucketManager((512, 512), 256, 1024, 64, False).buckets == SD15_BUCKETS


def test_sdxl_1024_with_max_2048():
    buckets = make_bucket_resolutions((1024, 1024), 256, 2048, 64)
    assert buckets == spec_rule(1024, 1024, 256, 2048, 64)
    assert len(buckets) == 41
    for member in [(1024, 1024), (896, 1152), (1152, 896), (832, 1216), (1216, 832), (768, 1344), (640, 1536),
                   (256, 2048), (2048, 512), (1856, 512)]:
        assert member in buckets
    assert (1024, 1088) not in buckets


@pytest.mark.parametrize(("reso", "low", "high", "step"), [
    ((512, 512), 256, 1024, 64), ((768, 512), 256, 1024, 64), ((1024, 1024), 256, 2048, 64),
    ((1024, 768), 256, 2048, 32), ((640, 640), 320, 960, 64), ((1280, 720), 256, 1536, 64),
])
def test_buckets_follow_the_rule_and_never_exceed_the_area(reso, low, high, step):
    buckets = make_bucket_resolutions(reso, low, high, step)
    assert buckets == spec_rule(*reso, low, high, step)
    assert buckets == sorted(set(buckets))
    for w, h in buckets:
        assert w * h <= reso[0] * reso[1]
        assert w % step == 0 and h % step == 0
        assert max(w, h) <= high


# (image size) -> (bucket, resized), resolution 512, defaults 256/1024/64, upscaling allowed
UPSCALE_TABLE = [
    ((512, 512), (512, 512), (512, 512)),  # exact match
    ((448, 576), (448, 576), (448, 576)),  # exact match of a non-square bucket: no resize
    ((1000, 1000), (512, 512), (512, 512)),
    ((640, 480), (576, 448), (597, 448)),  # nearest ratio 1.2857 for 1.3333; wider, so the height is matched
    ((480, 640), (448, 576), (448, 597)),
    ((300, 1000), (256, 832), (256, 853)),  # 0.3 is nearer 0.3077 than 0.2857; narrower, so the width is matched
    ((2700, 800), (832, 256), (864, 256)),  # ratio 3.375 ties 3.25 and 3.5 exactly: the first in sorted order
    ((270, 910), (256, 832), (256, 863)),  # 0.2967 ties 0.3077 and 0.2857 exactly: again the first
    ((100, 100), (512, 512), (512, 512)),  # tiny images are upscaled
    ((64, 48), (576, 448), (597, 448)),
    ((10, 1000), (256, 1024), (256, 25600)),  # extreme ratios still cover their bucket
]


@pytest.mark.parametrize(("size", "bucket", "resized"), UPSCALE_TABLE)
def test_assignment_with_upscaling(size, bucket, resized):
    assignment = BucketManager((512, 512), 256, 1024, 64, False).assign(size)
    assert assignment.bucket == bucket
    assert assignment.resized == resized
    assert assignment.ar_error == pytest.approx(bucket[0] / bucket[1] - size[0] / size[1])
    assert assignment.resized[0] >= bucket[0] and assignment.resized[1] >= bucket[1]


# resolution 512 (area 262144), steps 64, no upscaling
NO_UPSCALE_TABLE = [
    ((512, 512), (512, 512), (512, 512)),
    ((100, 100), (64, 64), (100, 100)),  # small: kept at its own size, bucket floored to steps
    ((300, 70), (256, 64), (300, 70)),
    ((1000, 1000), (512, 512), (512, 512)),  # both candidates exact: the height candidate wins the tie
    ((4000, 3000), (512, 384), (512, 384)),  # height candidate 512x384 is exact, width candidate 576x384 is not
    ((3000, 1000), (768, 256), (768, 256)),
    ((1000, 700), (576, 384), (576, 403)),  # width candidate 576/384 (err .071) beats 512/384 (err .095)
    ((600, 500), (512, 448), (538, 448)),  # height candidate wins; width 538 floors to 512 (cropped)
]


@pytest.mark.parametrize(("size", "bucket", "resized"), NO_UPSCALE_TABLE)
def test_assignment_without_upscaling(size, bucket, resized):
    manager = BucketManager((512, 512), 256, 1024, 64, True)
    assert manager.buckets == []
    assignment = manager.assign(size)
    assert (assignment.bucket, assignment.resized) == (bucket, resized)
    assert assignment.resized[0] <= size[0] and assignment.resized[1] <= size[1]
    assert assignment.bucket[0] * assignment.bucket[1] <= 512 * 512


def test_no_upscale_candidates_follow_the_spec_arithmetic():
    # Spec §2.2 by hand for 1000x700: rw = sqrt(A*ar) = 611.9, rh = 428.4.
    ar, area = 1000 / 700, 512 * 512
    rw = math.sqrt(area * ar)
    rh = area / rw

    def round_to_steps(x: float) -> int:
        return int(x + 0.5) // 64 * 64

    bw = round_to_steps(rw)
    bh_a = round_to_steps(bw / ar)
    bh = round_to_steps(rh)
    bw_b = round_to_steps(bh * ar)
    assert (bw, bh_a, bw_b, bh) == (576, 384, 512, 384)
    assert abs(bw / bh_a - ar) < abs(bw_b / bh - ar)
    assert BucketManager((512, 512), no_upscale=True).assign((1000, 700)).resized == (bw, int(bw / ar + 0.5))


def test_no_upscale_rejects_an_image_too_thin_for_any_bucket():
    with pytest.raises(ValueError, match="30x500"):
        BucketManager((512, 512), no_upscale=True).assign((30, 500))


@pytest.mark.parametrize(("size", "bucket", "resized"), [
    ((128, 64), (128, 64), (128, 64)),  # area 8192 > 4096, but shrinking would leave 45 px: kept at one step
    ((96, 64), (64, 64), (96, 64)),
    ((64, 200), (64, 192), (64, 200)),
    ((256, 128), (128, 64), (128, 64)),  # shrinks as far as one step allows
])
def test_no_upscale_never_shrinks_the_short_side_below_one_step(size, bucket, resized):
    # sd-scripts divides by zero here (both candidates round a side to 0); we keep one step on the short side.
    manager = BucketManager((64, 64), 64, 256, 64, True)
    assignment = manager.assign(size)
    assert (assignment.bucket, assignment.resized) == (bucket, resized)


def test_fixed_bucket_covers_and_crops_to_the_resolution():
    manager = fixed_bucket((512, 512))
    assert manager.buckets == [(512, 512)]
    assert manager.assign((1024, 768)) == BucketAssignment((512, 512), (683, 512), 1 - 1024 / 768)
    assert manager.assign((300, 600)).resized == (512, 1024)
    assert manager.assign((512, 512)).resized == (512, 512)
    assert fixed_bucket((768, 512)).assign((768, 512)).bucket == (768, 512)
    assert BucketManager.fixed((768, 512)).buckets == [(768, 512)]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"resolution": (512, 512), "max_size": 256, "min_size": 128}, "long side"),
    ({"resolution": (512, 768), "max_size": 640}, "long side"),
    ({"resolution": (512, 512), "min_size": 768, "max_size": 512}, "smaller than min_bucket_reso"),
    ({"resolution": (512, 512), "min_size": 640, "max_size": 1024}, "short side"),
    ({"resolution": (512, 512), "steps": 0}, "bucket_reso_steps"),
    ({"resolution": (0, 512)}, "positive"),
    ({"resolution": (512, 512), "min_size": 32}, "min_bucket_reso"),
])
def test_invalid_settings_raise_a_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BucketManager(**kwargs)


def test_min_and_max_are_rounded_to_steps_with_a_note():
    manager = BucketManager((512, 512), min_size=200, max_size=1000, steps=64)
    assert (manager.min_size, manager.max_size) == (192, 1024)
    assert len(manager.notes) == 2 and "200" in manager.notes[0] and "1000" in manager.notes[1]
    assert manager.buckets == make_bucket_resolutions((512, 512), 192, 1024, 64)
    assert BucketManager((512, 512)).notes == []


def test_histogram_counts_images_per_bucket_in_bucket_order():
    manager = BucketManager((512, 512))
    assignments = [manager.assign(size) for size in [(640, 480), (1000, 1000), (512, 512), (480, 640), (800, 600)]]
    histogram = bucket_histogram(assignments)
    assert histogram == {(448, 576): 1, (512, 512): 2, (576, 448): 2}
    assert list(histogram) == sorted(histogram)
    assert bucket_histogram([]) == {}


@pytest.mark.parametrize(("size", "first", "second"), [
    ((2700, 800), (832, 256), (896, 256)),
    ((270, 910), (256, 832), (256, 896)),
])
def test_ties_go_to_the_first_bucket_in_sorted_order(size, first, second):
    manager = BucketManager((512, 512))
    ratio = size[0] / size[1]
    assert abs(first[0] / first[1] - ratio) == abs(second[0] / second[1] - ratio)  # a genuine tie
    assert manager.buckets.index(first) < manager.buckets.index(second)
    assert manager.assign(size).bucket == first
