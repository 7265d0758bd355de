"""saving.keep_best's retention rule (engine.rundir.naming.retire_sparing_best): only the best stem outlives the
retention window, and only until a better one comes."""

from engine.rundir.naming import retire_sparing_best


def test_the_best_is_spared_then_removed_once_another_is_best():
    assert retire_sparing_best(["a-2"], [], best="a-2") == ([], ["a-2"])  # retired but the best: kept
    assert retire_sparing_best(["a-4"], ["a-2"], best="a-2") == (["a-4"], ["a-2"])
    assert retire_sparing_best(["a-6"], ["a-2"], best="a-8") == (["a-2", "a-6"], [])  # a newer best: both go
    assert retire_sparing_best([], ["a-2"], best=None) == (["a-2"], [])  # keep_best off (or no loss yet)
    assert retire_sparing_best(["a-2"], ["a-2"], best="a-2") == ([], ["a-2"])  # never listed twice
