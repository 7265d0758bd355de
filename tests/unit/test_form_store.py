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
