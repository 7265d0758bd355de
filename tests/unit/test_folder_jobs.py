"""gui.jobs.FolderJobs: one job per folder, which Stop finds; the folder is free again once the job's block ends."""

from __future__ import annotations

import tempfile

import pytest

from gui.jobs import EngineJob, FolderJobs


@pytest.fixture(autouse=True)
def _job_folders_in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # each EngineJob makes its work folder there


def test_a_folder_holds_one_job_at_a_time_and_stop_finds_it():
    jobs = FolderJobs()
    assert not jobs.stop("/photos")  # nothing runs there
    with jobs.claim("/photos", ["caption", "/photos"]) as job:
        assert isinstance(job, EngineJob) and job.argv[-2:] == ["--events", str(job.events_path)]
        with jobs.claim("/photos", ["caption", "/photos"]) as second:
            assert second is None  # the first job keeps the folder
        with jobs.claim("/other", ["caption", "/other"]) as other:
            assert other is not None  # another folder is free
        assert jobs.stop("/photos")  # found (not started: cancelling does nothing)
    assert not jobs.stop("/photos")
    with jobs.claim("/photos", ["caption", "/photos"]) as again:
        assert again is not None


def test_the_folder_is_freed_when_the_handler_fails_or_is_closed():
    jobs = FolderJobs()
    with pytest.raises(RuntimeError), jobs.claim("/photos", ["caption"]):
        raise RuntimeError("the handler failed")
    assert not jobs.stop("/photos")

    def handler():
        with jobs.claim("/photos", ["caption"]) as job:
            yield job

    running = handler()
    assert next(running) is not None and jobs.stop("/photos")
    running.close()  # the page went away mid-job: Gradio closes the generator
    assert not jobs.stop("/photos")
