"""A hub download's bytes reach the job page while the worker fetches the base model."""

from app import queue
from tests.fakes.jobs import add_dataset, add_job
from worker.job_io import DatabaseControl
from worker.run import download_progress


def test_download_bytes_are_written_to_the_job_and_shown_on_its_page(db, settings, client):
    job = add_job(db, settings, dataset_id=add_dataset(db, settings))
    claim = queue.claim_next_job(db, "w", lease_seconds=60)
    assert claim is not None and claim.job_id == job.id
    control = DatabaseControl(db, claim.job_id, claim.attempt)

    # The class huggingface_hub builds its byte bars from; the bars themselves may be disabled.
    bar = download_progress(control)(total=5_000_000, unit="B", disable=True)
    bar.update(2_000_000)
    bar.update(1_000_000)  # within a second of the last report: not written yet

    shown = queue.get_job(db, claim.job_id)
    assert (shown.download_done_bytes, shown.download_total_bytes) == (2_000_000, 5_000_000)
    header = client.get(f"/partials/jobs/{claim.job_id}/header").text
    assert "Downloading the base model" in header
    assert '<progress max="5000000" value="2000000">' in header


def test_the_adapter_route_redirects_to_the_download_or_says_there_is_none(db, settings, client):
    job = add_job(db, settings, dataset_id=add_dataset(db, settings))
    missing = client.get(f"/api/jobs/{job.id}/adapter", follow_redirects=False)
    assert missing.status_code == 404
    assert "no adapter" in missing.json()["error"]["message"]
