"""gui.form_store: each user's Parameters form is kept on the server, in its own file beside the runs."""

from gui.form_store import FormStore, user_name


def test_each_user_gets_their_own_file_and_reads_back_what_was_saved(tmp_path):
    store = FormStore(tmp_path)
    store.save(user_name(None), {"network.network_dim": 12, "dataset.datasets": [{"subsets": []}]})
    store.save("ann", {"network.network_dim": 4})
    assert store.path("local") == tmp_path / ".atelier" / "form-local.json"
    assert store.load("local") == {"network.network_dim": 12, "dataset.datasets": [{"subsets": []}]}
    assert store.load("ann") == {"network.network_dim": 4}
    assert store.load("bob") == {}


def test_odd_user_names_stay_inside_the_folder_and_apart(tmp_path):
    store = FormStore(tmp_path)
    names = ["../../etc/passwd", "a/b", "a b", "a-b"]
    paths = {store.path(name) for name in names}
    assert len(paths) == len(names)
    assert all(path.parent == tmp_path / ".atelier" for path in paths)


def test_only_fields_still_in_the_form_come_back_and_a_damaged_file_is_ignored(tmp_path):
    store = FormStore(tmp_path)
    store.save("local", {"network.network_dim": 12, "gone.field": 1})
    assert store.load("local", {"network.network_dim"}) == {"network.network_dim": 12}
    store.path("local").write_text("{not json", encoding="utf-8")
    assert store.load("local") == {}


def test_a_form_that_cannot_be_kept_says_why_and_does_not_stop_the_form(tmp_path):
    (tmp_path / ".atelier").write_text("a file where the folder should be", encoding="utf-8")
    store = FormStore(tmp_path)
    note = store.save("local", {"network.network_dim": 12})
    assert "could not be kept" in note and str(tmp_path / ".atelier") in note
    assert store.load("local") == {}


def test_an_unchanged_form_is_written_again_only_when_its_file_is_gone(tmp_path):
    store = FormStore(tmp_path)
    assert store.save("local", {"network.network_dim": 12}) == ""
    written = store.path("local").stat().st_mtime_ns
    store.save("local", {"network.network_dim": 12})
    assert store.path("local").stat().st_mtime_ns == written
    store.path("local").unlink()
    store.save("local", {"network.network_dim": 12})
    assert store.load("local") == {"network.network_dim": 12}
