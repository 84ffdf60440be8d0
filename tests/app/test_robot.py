"""The robot link on loopback: the stand-in robot (a simulated maze behind the Robot interface) served by
`RobotServer`, driven by `RobotClient` and the remote backend; bounds, heartbeat, restarts and a tiny
`tmrl finetune` over the network."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from app.robot.client import RobotClient, RobotError
from app.robot.protocol import decode, encode
from app.robot.server import RobotServer, ServerConfig
from app.robot.sim import SimRobot
from app.tasks.registry import TaskConfig
from app.tasks.remote.backend import RemoteBackend


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A server for ``robot`` in a thread, stopped by ``stop()``."""

    def __init__(self, robot, **cfg) -> None:
        self.robot, self.address = robot, f"127.0.0.1:{cfg.pop('port', None) or free_port()}"
        self.server = RobotServer(robot, ServerConfig(self.address, **cfg), log=lambda line: None)
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self.server.serve, args=(self.halt,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.halt.set()
        self.thread.join(timeout=5)


@pytest.fixture
def maze_robot():
    robot = SimRobot(TaskConfig("pointmaze-medium", 1, max_episode_steps=40))
    yield robot
    robot.close()


def test_messages_round_trip_and_frames_travel_compressed():
    frame = np.zeros((1, 64, 64, 3), np.uint8)
    frames = encode({"op": "x"}, {"image": frame, "observation": np.arange(4, dtype=np.float32)})
    assert len(frames[1]) < frame.nbytes / 10  # zlib on a uniform frame
    header, arrays = decode(frames)
    assert header == {"op": "x"}
    np.testing.assert_array_equal(arrays["image"], frame)
    assert arrays["observation"].dtype == np.float32
    with pytest.raises(ValueError, match="array frames came"):
        decode(frames[:2])


def test_the_stand_in_robot_serves_episodes_and_clips_out_of_bounds_actions(maze_robot):
    served = Served(maze_robot, heartbeat_s=5.0)
    client = RobotClient(served.address, timeout_s=2.0, keepalive=False, log=lambda line: None)
    try:
        assert (
            client.spec["observation"]["observation"]["shape"] == [2]
            and client.spec["max_episode_steps"] == 40
        )
        first = client.reset()["observation"]
        obs, reply = client.step(np.array([5.0, -5.0]))  # far outside [-1, 1]
        assert reply["info"]["clipped"] and not reply["truncated"]
        moved = obs["observation"][:2] - first[:2]
        ref = SimRobot(TaskConfig("pointmaze-medium", 1, max_episode_steps=40))
        ref.reset()
        expected = ref.step(np.array([1.0, -1.0]))[0]["observation"][:2] - first[:2]
        ref.close()
        np.testing.assert_allclose(moved, expected, atol=1e-5)  # exactly the clipped action was applied
        for _ in range(39):
            obs, reply = client.step(np.zeros(2))
        assert reply["truncated"] and served.server.steps == 40  # the robot's time limit
        obs, reply = client.step(np.zeros(2))  # a step after the end is answered, never run
        assert reply["truncated"] and "ended" in reply["info"] and served.server.stats["steps"] == 40
        with pytest.raises(RobotError, match="expected 2 finite values"):
            client.reset()
            client.step(np.array([np.nan, 0.0]))
        assert client.latency_ms()["step"] < 50
    finally:
        client.close()
        served.stop()


def test_a_refused_action_does_not_move_the_robot(maze_robot):
    served = Served(maze_robot, out_of_bounds="refuse")
    client = RobotClient(served.address, keepalive=False, log=lambda line: None)
    try:
        client.reset()
        with pytest.raises(RobotError, match="outside the robot's box.*did not move"):
            client.step(np.array([1.5, 0.0]))
        assert served.server.stats == {**served.server.stats, "steps": 0, "refused": 1}
        _, reply = client.step(np.array([1.0, 0.0]))  # the edge of the box is inside it
        assert not reply["truncated"] and served.server.stats["steps"] == 1
    finally:
        client.close()
        served.stop()


def test_a_missed_heartbeat_stops_the_robot_and_ends_the_episode(maze_robot):
    served = Served(maze_robot, heartbeat_s=0.3)
    client = RobotClient(served.address, keepalive=False, log=lambda line: None)
    try:
        client.reset()
        client.step(np.zeros(2))
        time.sleep(0.8)  # the learner goes silent
        assert maze_robot.safe_stops >= 1 and served.server.stats["heartbeat_stops"] == 1
        _, reply = client.step(np.zeros(2))
        assert reply["truncated"] and "heartbeat missed" in reply["info"]["ended"]
        # with the keep-alive, a learner that thinks for as long keeps its episode (the robot holds)
        alive = RobotClient(served.address, keepalive=True, log=lambda line: None)
        alive.reset()
        time.sleep(0.8)
        _, reply = alive.step(np.zeros(2))
        alive.close()
        assert not reply["truncated"] and served.server.stats["holds"] >= 1
    finally:
        client.close()
        served.stop()


def test_the_learner_reconnects_after_a_server_restart_and_loses_only_the_episode(maze_robot):
    port = free_port()
    served = Served(maze_robot, port=port)
    said: list[str] = []
    backend = RemoteBackend(
        served.address, client=RobotClient(served.address, timeout_s=0.3, log=said.append)
    )
    try:
        backend.reset()
        backend.step(np.zeros((1, 2), np.float32), np.ones(1, bool))
        served.stop()  # the robot's computer goes away mid-episode ...
        back = threading.Timer(1.0, lambda: said.append(Served(maze_robot, port=port)))  # ... and returns
        back.start()
        out = backend.step(np.zeros((1, 2), np.float32), np.ones(1, bool))
        assert out["truncated"][0] and "restarted" in backend.ended[-1]  # the episode is lost, not the run
        assert any("not answering" in s for s in said if isinstance(s, str))
        backend.reset()  # and the next one runs
        assert not backend.step(np.zeros((1, 2), np.float32), np.ones(1, bool))["truncated"][0]
    finally:
        backend.close()
        for s in said:
            if isinstance(s, Served):
                s.stop()


def test_a_tiny_finetune_runs_against_a_robot_server_process(tmp_path, monkeypatch, capsys):
    from app.cli import main
    from tests.app.test_fit_e2e import tiny_overrides
    from tests.tiny import tiny_config

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert (
        main(["fit", "--config", tiny_config("csp_state"), *tiny_overrides(tmp_path), "eval.enabled=false"])
        == 0
    )
    fit = capsys.readouterr().out.strip().splitlines()[-1].split("=", 1)[1]
    port = free_port()
    cmd = [sys.executable, "-m", "app.cli", "robot-server", "--env", "pointmaze-medium", "--task-id", "1"]
    server = subprocess.Popen([*cmd, "--max-episode-steps", "60", "--address", f"127.0.0.1:{port}"])
    try:
        args = ["--config", tiny_config("tmrl"), "task.env=remote", f"task.address=127.0.0.1:{port}"]
        args += ["collect.num_envs=1", "eval.episodes=1", "task.task_id=null", f"output_dir={tmp_path}"]
        assert main(["finetune", "--from-run", fit, *args]) == 0
        out = capsys.readouterr().out
        assert "env steps, final eval success" in out
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_the_latency_measurement_runs_both_ways_and_reports_positive_rates(capsys):
    from app.robot.latency import main as latency

    assert latency(["--steps", "40", "--port", str(free_port())]) == 0
    out = capsys.readouterr().out
    rates = re.findall(r"(\d+) env steps/s|: (\d+)/s", out)
    assert len(rates) == 2 and all(int(a or b) > 0 for a, b in rates), out
    assert re.search(r"round trip per step: median \d+\.\d+ ms", out), out


class BlindRobot(SimRobot):
    """The stand-in robot without a success detector: only a human can tell."""

    def step(self, action):
        obs, reward, terminated, truncated, _ = super().step(action)
        return obs, 0.0, False, truncated, {}


def test_the_human_confirms_each_reset_and_labels_success_the_robot_cannot_detect():
    robot = BlindRobot(TaskConfig("pointmaze-medium", 1, max_episode_steps=5))
    asked: list[str] = []
    answers = iter(["", "y", "", "n"])  # Enter, success, Enter, failure

    def human(question: str) -> str:
        asked.append(question)
        return next(answers)

    address = f"127.0.0.1:{free_port()}"
    server = RobotServer(
        robot, ServerConfig(address, confirm_reset=True, label_success=True), human, log=lambda line: None
    )
    halt = threading.Event()
    thread = threading.Thread(target=server.serve, args=(halt,), daemon=True)
    thread.start()
    backend = RemoteBackend(address, client=RobotClient(address, keepalive=False, log=lambda line: None))
    try:
        assert backend.client.spec["human_reset"]
        for label in (True, False):
            backend.reset()
            assert "put the scene back" in asked[-1]
            for step in range(5):
                out = backend.step(np.zeros((1, 2), np.float32), np.ones(1, bool))
                assert out["success"][0] == (label and step == 4)  # the label lands on the episode's end
            assert out["truncated"][0] and out["reward"][0] == float(label)
            assert "success? [y/n]" in asked[-1]
        assert len(asked) == 4
    finally:
        backend.close()
        halt.set()
        thread.join(timeout=5)


def test_a_finetune_goes_on_after_its_robot_server_is_killed_and_keeps_its_buffer(
    tmp_path, monkeypatch, capsys
):
    import torch

    from app.cli import main
    from tests.app.test_fit_e2e import tiny_overrides
    from tests.tiny import tiny_config

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    fit_args = ["fit", "--config", tiny_config("csp_state"), *tiny_overrides(tmp_path), "eval.enabled=false"]
    assert main(fit_args) == 0
    fit = capsys.readouterr().out.strip().splitlines()[-1].split("=", 1)[1]
    port = free_port()
    cmd = [sys.executable, "-m", "app.cli", "robot-server", "--env", "pointmaze-medium", "--task-id", "1"]
    cmd += ["--max-episode-steps", "60", "--address", f"127.0.0.1:{port}"]
    servers = [subprocess.Popen(cmd)]
    real_step, calls = RemoteBackend.step, []

    def step(self, actions, mask):  # the robot's computer dies mid-episode, and comes back a second later
        calls.append(1)
        if len(calls) == 150:
            servers[-1].kill()
            servers[-1].wait()
            threading.Timer(1.0, lambda: servers.append(subprocess.Popen(cmd))).start()
        return real_step(self, actions, mask)

    monkeypatch.setattr(RemoteBackend, "step", step)
    try:
        args = ["--config", tiny_config("tmrl"), "task.env=remote", f"task.address=127.0.0.1:{port}"]
        args += ["collect.num_envs=1", "eval.episodes=1", "task.task_id=null", f"output_dir={tmp_path}"]
        args += ["checkpoint_every_env_steps=8"]  # every batch: the last checkpoint is the run's end
        assert main(["finetune", "--from-run", fit, *args]) == 0
        out = capsys.readouterr().out
        assert len(servers) == 2 and "not answering" in out and "answers again" in out
        assert "robot episode ended early: not this server's current episode" in out
        (ckpt,) = tmp_path.glob("*/checkpoints/agent_last.pt")
        saved = torch.load(ckpt, weights_only=False)
        assert saved["counters"]["env_steps"] >= 400
        assert saved["replay_size"] == saved["counters"]["chunks"]  # nothing collected before the kill lost
        from mlflow.tracking import MlflowClient

        store = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        ids = [e.experiment_id for e in store.search_experiments()]
        (run,) = [r for r in store.search_runs(ids) if "robot/reconnects" in r.data.metrics]
        assert run.data.metrics["robot/reconnects"] >= 1 and 0 < run.data.metrics["robot/step_rtt_ms"] < 1000
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=10)


def test_the_issue_spelling_env_remote_env_address_sets_the_task(capsys):
    from app.cli import main, task_aliases

    assert task_aliases(["env=remote", "env.address=h:1", "env_steps=9"]) == [
        "task.env=remote", "task.address=h:1", "env_steps=9",
    ]  # fmt: skip
    args = ["finetune", "--from-run", "x", "--print-config", "env=remote", "env.address=127.0.0.1:5599"]
    assert main([*args, "collect.num_envs=1", "eval.episodes=1"]) == 0
    out = capsys.readouterr().out
    assert "  env: remote\n" in out and "  address: 127.0.0.1:5599\n" in out
