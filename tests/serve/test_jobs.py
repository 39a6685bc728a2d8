"""End-to-end tests of the fine-tuning API of `graft serve --jobs`, driven by the official
`openai` SDK unchanged (only base_url and the key differ). Run by scripts/test_jobs.sh, which
sets GRAFT_BIN (the graft binary) and GRAFT_FIXTURE (stories260K with a chat template, from
make_fixture.py). The tests start the server themselves so one of them can kill it with
SIGKILL mid-job and start it again on the same state directory.
"""

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

import openai
import pytest
from openai import OpenAI

BIN = os.environ["GRAFT_BIN"]
FIXTURE = os.environ["GRAFT_FIXTURE"]
# With GRAFT_DATABASE=postgres://…, the state is in PostgreSQL: the server only queues jobs and
# two `graft worker` processes train them (one is killed mid-job by a test).
DATABASE = os.environ.get("GRAFT_DATABASE")
KEY1, KEY2 = "sk-jobs-one", "sk-jobs-two"


class Server:
    """A `graft serve --jobs` process on a state directory that outlives restarts."""

    def __init__(self):
        self.state = tempfile.mkdtemp(prefix="graft-jobs-")
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.proc = None
        self.workers = []
        self.log = open(os.path.join(self.state, "server.log"), "ab")

    def start(self):
        shared = ["--state-dir", self.state, "--train-threads", "1"]
        if DATABASE:
            shared += ["--database", DATABASE, "--lease-seconds", "3"]
        self.proc = subprocess.Popen(
            [BIN, "serve", "--model", f"{FIXTURE}/model", "--served-model-name", "stories",
             "--host", "127.0.0.1", "--port", str(self.port), "--api-key", KEY1, "--api-key", KEY2,
             "--jobs", "--shutdown-grace", "2", *shared]
            + (["--max-concurrent-jobs", "0"] if DATABASE else []),
            stdout=self.log, stderr=self.log)
        if DATABASE:
            while len([w for w in self.workers if w.poll() is None]) < 2:
                self.start_worker()
        url = f"http://127.0.0.1:{self.port}/health"
        for _ in range(300):
            try:
                urllib.request.urlopen(url, timeout=2)
                return
            except Exception:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited: {self.tail()}")
                time.sleep(0.1)
        raise RuntimeError("server did not come up")

    def start_worker(self):
        cmd = [BIN, "worker", "--model", f"{FIXTURE}/model", "--served-model-name", "stories",
               "--database", DATABASE, "--state-dir", self.state, "--train-threads", "1",
               "--lease-seconds", "3"]
        self.workers.append(subprocess.Popen(cmd, stdout=self.log, stderr=self.log))

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def worker_of(self, job_id):
        """The pid of the worker holding `job_id` (from the shared database)."""
        out = subprocess.run(["psql", DATABASE, "-tAc", f"SELECT worker FROM jobs WHERE id = '{job_id}'"],
                             capture_output=True, text=True, check=True).stdout.strip()
        return int(out.rsplit("-", 2)[1]) if out else None  # host-pid-thread

    def stop(self):
        for w in self.workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in self.workers:
            try:
                w.wait(timeout=60)
            except subprocess.TimeoutExpired:
                w.kill()
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def tail(self):
        with open(os.path.join(self.state, "server.log"), "rb") as f:
            return f.read()[-4000:].decode(errors="replace")

    def client(self, key=KEY1):
        return OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def server():
    s = Server()
    s.start()
    yield s
    s.stop()
    print(s.tail())


def chat_rows(n, offset=0):
    return [{"messages": [{"role": "system", "content": "You answer sums."},
                          {"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}
            for i in range(offset, offset + n)]


def dpo_rows(n):
    return [{"input": {"messages": [{"role": "user", "content": f"Say hi to {i}"}]},
             "preferred_output": [{"role": "assistant", "content": f"Hello {i}, nice to meet you!"}],
             "non_preferred_output": [{"role": "assistant", "content": "Go away."}]}
            for i in range(n)]


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def upload(client, rows, name="train.jsonl"):
    return client.files.create(file=(name, jsonl(rows)), purpose="fine-tune")


def wait(client, job_id, states, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        j = client.fine_tuning.jobs.retrieve(job_id)
        if j.status in states:
            return j
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} still {j.status} after {timeout}s")


def all_events(client, job_id):
    events = list(client.fine_tuning.jobs.list_events(job_id, limit=5))  # auto-paginates
    return list(reversed(events))  # oldest first


def metrics_steps(events):
    return [e.data["step"] for e in events if e.type == "metrics"]


def test_supervised_end_to_end(server):
    c = server.client()
    f = upload(c, chat_rows(12))
    assert f.purpose == "fine-tune" and f.status == "processed" and f.bytes > 0
    assert c.files.retrieve(f.id).filename == "train.jsonl"
    assert c.files.content(f.id).content == jsonl(chat_rows(12))
    v = upload(c, chat_rows(10, offset=100), "valid.jsonl")
    job = c.fine_tuning.jobs.create(
        model="stories", training_file=f.id, validation_file=v.id, suffix="sums", seed=7,
        metadata={"team": "math"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 2}}})
    assert job.status in ("validating_files", "queued") and job.model == "stories"
    assert job.hyperparameters.n_epochs == 2 and job.seed == 7
    job = wait(c, job.id, {"succeeded", "failed"})
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:stories:sums:{job.id[len('ftjob-'):]}"
    assert job.trained_tokens and job.trained_tokens > 0 and job.finished_at
    events = all_events(c, job.id)
    messages = [e.message for e in events]
    assert messages[0].startswith("Validating training file")
    assert "Fine-tuning job started" in messages
    assert messages[-1] == "The job has successfully completed"
    steps = metrics_steps(events)
    assert steps == list(range(1, 13)), steps
    assert any("valid_loss" in e.data for e in events if e.type == "metrics")
    ckpts = list(c.fine_tuning.jobs.checkpoints.list(job.id))
    assert [k.step_number for k in ckpts] == [12, 6]
    assert ckpts[0].metrics.train_loss is not None
    # The model answers at once, by name, as does a checkpoint.
    r = c.chat.completions.create(model=job.fine_tuned_model, max_tokens=8,
                                  messages=[{"role": "user", "content": "What is 3 plus 3?"}])
    assert r.model == job.fine_tuned_model and r.choices[0].message.content is not None
    r = c.chat.completions.create(model=ckpts[1].fine_tuned_model_checkpoint, max_tokens=4,
                                  messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].finish_reason in ("length", "stop")
    assert job.fine_tuned_model in [m.id for m in c.models.list()]
    csv = c.files.content(job.result_files[0]).text.splitlines()
    assert csv[0].startswith("step,train_loss") and len(csv) == 13
    # Deleting the model takes it out of /v1/models and chat.
    assert c.models.delete(job.fine_tuned_model).deleted
    assert job.fine_tuned_model not in [m.id for m in c.models.list()]
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model=job.fine_tuned_model, max_tokens=2,
                                  messages=[{"role": "user", "content": "hi"}])
    # Metadata filter.
    listed = c.fine_tuning.jobs.list(metadata={"team": "math"})
    assert job.id in [j.id for j in listed.data]
    assert job.id not in [j.id for j in c.fine_tuning.jobs.list(metadata={"team": "other"}).data]


def test_dpo_job(server):
    c = server.client()
    f = upload(c, dpo_rows(10))
    job = c.fine_tuning.jobs.create(
        model="stories", training_file=f.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1, "batch_size": 2}}})
    assert job.method.dpo.hyperparameters.beta == 0.2
    job = wait(c, job.id, {"succeeded", "failed"})
    assert job.status == "succeeded", job.error
    assert metrics_steps(all_events(c, job.id)) == [1, 2, 3, 4, 5]
    r = c.chat.completions.create(model=job.fine_tuned_model, max_tokens=4,
                                  messages=[{"role": "user", "content": "Say hi to 3"}])
    assert r.choices[0].message.content is not None


def test_continue_from_a_fine_tuned_model(server):
    c = server.client()
    f = upload(c, chat_rows(10))
    first = wait(c, c.fine_tuning.jobs.create(model="stories", training_file=f.id,
                                              method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}}).id,
                 {"succeeded", "failed"})
    assert first.status == "succeeded", first.error
    second = c.fine_tuning.jobs.create(model=first.fine_tuned_model, training_file=f.id,
                                       hyperparameters={"n_epochs": 1})
    second = wait(c, second.id, {"succeeded", "failed"})
    assert second.status == "succeeded", second.error
    assert second.model == first.fine_tuned_model


def test_bad_requests_have_openai_error_shape(server):
    c = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        upload(c, chat_rows(3))
    assert e.value.body["param"] == "file" and "at least 10" in e.value.body["message"]
    rows = chat_rows(12)
    rows[4]["messages"][1]["role"] = "usr"
    with pytest.raises(openai.BadRequestError) as e:
        upload(c, rows)
    assert "Line 5" in e.value.body["message"] and "messages[1].role" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.files.create(file=("x.jsonl", b'{"messages": [\n'), purpose="fine-tune")
    assert "Line 1" in e.value.body["message"]
    good = upload(c, chat_rows(10))
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.create(model="stories", training_file=good.id, method={"type": "dpo"})
    assert e.value.body["param"] == "training_file"
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.create(model="stories", training_file=good.id, extra_body={"learning_rate": 1})
    assert e.value.body["param"] == "learning_rate"
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.create(model="stories", training_file=good.id,
                                  method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}})
    assert e.value.body["param"] == "method.supervised.hyperparameters.n_epochs"
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=good.id)
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.create(model="stories", training_file="file-nope")
    assert e.value.body["param"] == "training_file"
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.create(model="stories", training_file=good.id, extra_body={"graft": {"lora.rank": 4}})
    assert "lora.rank" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        c.fine_tuning.jobs.retrieve("ftjob-nope")


def long_job(c, **extra):
    f = upload(c, chat_rows(40))
    return c.fine_tuning.jobs.create(
        model="stories", training_file=f.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 1}}},
        extra_body={"graft": {"train.save_every": 25, **extra}})


def wait_steps(c, job_id, n, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = metrics_steps(all_events(c, job_id))
        if steps and steps[-1] >= n:
            return steps[-1]
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} did not reach step {n}")


def test_pause_resume_cancel_and_queue(server):
    c = server.client()
    running = long_job(c)
    queued = long_job(c)
    wait_steps(c, running.id, 30)
    if not DATABASE:
        # One worker: the second job waits, and can be cancelled while it does.
        assert c.fine_tuning.jobs.retrieve(queued.id).status == "queued"
    assert c.fine_tuning.jobs.cancel(queued.id).status == "cancelled"
    wait(c, queued.id, {"cancelled"})
    c.fine_tuning.jobs.pause(running.id)
    paused = wait(c, running.id, {"paused"})
    step = metrics_steps(all_events(c, running.id))[-1]
    time.sleep(1.0)
    assert metrics_steps(all_events(c, running.id))[-1] == step, "a paused job kept training"
    assert any(k.step_number == step for k in c.fine_tuning.jobs.checkpoints.list(running.id))
    c.fine_tuning.jobs.resume(running.id)
    wait_steps(c, running.id, step + 5)
    events = all_events(c, running.id)
    assert f"Fine-tuning job resumed from step {step}" in [e.message for e in events]
    steps = metrics_steps(events)
    assert steps == list(range(1, len(steps) + 1)), "metrics events repeated or skipped a step"
    c.fine_tuning.jobs.cancel(running.id)
    job = wait(c, running.id, {"cancelled"})
    assert job.fine_tuned_model is None and paused.status == "paused"
    with pytest.raises(openai.BadRequestError):
        c.fine_tuning.jobs.resume(running.id)


def test_list_pagination(server):
    c = server.client(KEY2)
    f = upload(c, chat_rows(10))
    ids = []
    for _ in range(5):
        j = c.fine_tuning.jobs.create(model="stories", training_file=f.id, hyperparameters={"n_epochs": 1})
        ids.append(j.id)
    page = c.fine_tuning.jobs.list(limit=2)
    assert len(page.data) == 2 and page.has_more
    seen = [j.id for j in c.fine_tuning.jobs.list(limit=2)]  # every page
    assert seen[:5] == list(reversed(ids)), "jobs are listed newest first"
    files = [x.id for x in c.files.list(limit=1)]
    assert f.id in files
    for j in ids:
        wait(c, j, {"succeeded", "failed", "cancelled"})


def test_projects_are_isolated(server):
    one, two = server.client(KEY1), server.client(KEY2)
    f = upload(one, chat_rows(10))
    job = wait(one, one.fine_tuning.jobs.create(model="stories", training_file=f.id,
                                                hyperparameters={"n_epochs": 1}).id, {"succeeded", "failed"})
    assert job.status == "succeeded"
    with pytest.raises(openai.NotFoundError):
        two.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        two.fine_tuning.jobs.retrieve(job.id)
    assert f.id not in [x.id for x in two.files.list()]
    assert job.id not in [j.id for j in two.fine_tuning.jobs.list()]
    assert job.fine_tuned_model not in [m.id for m in two.models.list()]
    with pytest.raises(openai.NotFoundError):
        two.chat.completions.create(model=job.fine_tuned_model, max_tokens=2,
                                    messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        two.fine_tuning.jobs.create(model="stories", training_file=f.id)
    # No response names a server path.
    body = json.dumps(one.fine_tuning.jobs.retrieve(job.id).model_dump())
    body += json.dumps([e.model_dump() for e in all_events(one, job.id)])
    assert server.state not in body


def test_kill9_mid_job_resumes_from_checkpoint(server):
    c = server.client()
    job = long_job(c)
    step = wait_steps(c, job.id, 60)
    assert step >= 60
    server.kill9()
    server.start()
    c = server.client()
    wait_steps(c, job.id, step + 10)
    events = all_events(c, job.id)
    messages = [e.message for e in events]
    if not DATABASE:  # in-process training died with the server; with workers it went on
        assert any(m.startswith("Fine-tuning job resumed from step") for m in messages), messages
    steps = metrics_steps(events)
    assert steps == list(range(1, len(steps) + 1)), "events lost or repeated across the crash"
    c.fine_tuning.jobs.cancel(job.id)
    wait(c, job.id, {"cancelled"})


@pytest.mark.skipif(not DATABASE, reason="workers need GRAFT_DATABASE=postgres://…")
def test_worker_killed_mid_job_is_replaced(server):
    c = server.client()
    job = long_job(c)
    step = wait_steps(c, job.id, 40)
    pid = server.worker_of(job.id)
    assert pid, "the job has no worker"
    victim = next(w for w in server.workers if w.pid == pid)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    # The other worker takes the job once the dead one's lease runs out, from its checkpoint.
    wait_steps(c, job.id, step + 30, timeout=180)
    assert server.worker_of(job.id) != pid
    events = all_events(c, job.id)
    messages = [e.message for e in events]
    assert any("stopped answering" in m for m in messages), messages
    assert any(m.startswith("Fine-tuning job resumed from step") for m in messages), messages
    steps = metrics_steps(events)
    assert steps == list(range(1, len(steps) + 1)), "events lost or repeated across the crash"
    c.fine_tuning.jobs.cancel(job.id)
    wait(c, job.id, {"cancelled"})
    server.start_worker()


LILY = {"type": "string_check", "name": "has_lily", "input": "{{sample.output_text}}",
        "reference": "{{item.target}}", "operation": "like"}


def test_reinforcement_job_with_a_grader(server):
    c = server.client()
    rows = [{"messages": [{"role": "user", "content": f"Tell story {i}"}], "target": "Lily"} for i in range(10)]
    f = upload(c, rows)
    job = c.fine_tuning.jobs.create(
        model="stories", training_file=f.id,
        method={"type": "reinforcement", "reinforcement": {
            "grader": LILY,
            "hyperparameters": {"n_epochs": 1, "batch_size": 2, "compute_multiplier": 0.5}}},
        extra_body={"graft": {"grpo.max_completion_length": 24}})
    assert job.method.type == "reinforcement"
    job = wait(c, job.id, {"succeeded", "failed"})
    assert job.status == "succeeded", job.error
    metrics = [e.data for e in all_events(c, job.id) if e.type == "metrics"]
    assert len(metrics) == 5 and all("reward" in m for m in metrics), metrics
    r = c.chat.completions.create(model=job.fine_tuned_model, max_tokens=8,
                                  messages=[{"role": "user", "content": "Tell story 3"}])
    assert r.choices[0].message.content is not None
    # A supervised file is not a reinforcement file.
    sft = upload(c, chat_rows(10))
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.create(model="stories", training_file=sft.id,
                                  method={"type": "reinforcement", "reinforcement": {"grader": LILY}})
    assert e.value.body["param"] == "training_file"
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.create(model="stories", training_file=f.id,
                                  method={"type": "reinforcement", "reinforcement": {
                                      "grader": {**LILY, "operation": "equals"}}})
    assert e.value.body["param"] == "method.reinforcement.grader" and "operation" in e.value.body["message"]


def test_graders_run_and_validate(server):
    c = server.client()
    ok = c.fine_tuning.alpha.graders.run(grader=LILY, model_sample="Once, Lily ran.", item={"target": "Lily"})
    assert ok.reward == 1.0
    miss = c.fine_tuning.alpha.graders.run(grader=LILY, model_sample="Once, Tom ran.", item={"target": "Lily"})
    assert miss.reward == 0.0
    multi = {"type": "multi", "name": "m", "calculate_output": "0.5 * a + 0.5 * b",
             "graders": {"a": LILY, "b": {"type": "text_similarity", "name": "b", "input": "{{sample.output_text}}",
                                           "reference": "Once, Lily ran.", "evaluation_metric": "fuzzy_match"}}}
    r = c.fine_tuning.alpha.graders.run(grader=multi, model_sample="Once, Lily ran.", item={"target": "Lily"})
    assert abs(r.reward - 1.0) < 1e-9
    v = c.fine_tuning.alpha.graders.validate(grader=LILY)
    assert v.grader.name == "has_lily"
    with pytest.raises(openai.BadRequestError):
        c.fine_tuning.alpha.graders.validate(grader={**LILY, "operation": "equals"})
    with pytest.raises(openai.BadRequestError):  # python graders are off unless the server allows them
        c.fine_tuning.alpha.graders.validate(grader={"type": "python", "name": "p",
                                                     "source": "def grade(sample, item):\n    return 1.0\n"})
