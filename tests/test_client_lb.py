"""Client-side load balancing (issue 15): one client, one channel, two replicas behind one target.

With ``load_balancing="round_robin"`` (``--lb round_robin``, ``INFERENCE_LOAD_BALANCING``) calls reach
every address the target resolves to; by default gRPC's ``pick_first`` keeps them all on one. The two
replicas are real gRPC servers on 127.0.0.1 behind an ``ipv4:`` target, which resolves to a list,
as ``dns:///`` resolves a Kubernetes headless Service to every ready pod.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from clients import AsyncInferenceClient, ClientConfigError, InferenceClient, cli, resolve_connection
from tests.client_helpers import ScriptedServer

# Enough calls that a policy spreading them cannot miss a replica, while both connect.
CALLS = 40


@pytest.fixture
def replicas() -> Iterator[list[ScriptedServer]]:
    with ScriptedServer() as a, ScriptedServer() as b:
        yield [a, b]


def target_of(replicas: list[ScriptedServer]) -> str:
    return "ipv4:" + ",".join(r.target for r in replicas)


def calls_per_replica(replicas: list[ScriptedServer]) -> list[int]:
    return [len(r.servicer.calls("Chat")) for r in replicas]


def test_round_robin_spreads_one_clients_calls_over_both_replicas(replicas: list[ScriptedServer]) -> None:
    with InferenceClient(target_of(replicas), api_key="", load_balancing="round_robin", env={}) as client:
        for _ in range(CALLS):
            assert client.chat("hi", timeout_s=5).text == "whole"
    seen = calls_per_replica(replicas)
    assert sum(seen) == CALLS and min(seen) > 0, seen


def test_the_default_keeps_every_call_on_one_replica(replicas: list[ScriptedServer]) -> None:
    with InferenceClient(target_of(replicas), api_key="", env={}) as client:
        for _ in range(CALLS):
            client.chat("hi", timeout_s=5)
    assert sorted(calls_per_replica(replicas)) == [0, CALLS]


async def test_the_asyncio_client_takes_the_policy_from_the_environment(replicas: list[ScriptedServer]) -> None:
    env = {"INFERENCE_TARGET": target_of(replicas), "INFERENCE_LOAD_BALANCING": "round_robin"}
    client = AsyncInferenceClient(api_key="", env=env)
    try:
        for _ in range(CALLS):
            assert (await client.chat("hi", timeout_s=5)).text == "whole"
        async with client.chat_stream("hi", timeout_s=5) as stream:
            assert "".join([text async for text in stream]) == "whole"
    finally:
        await client.close()
    seen = calls_per_replica(replicas)
    assert sum(seen) == CALLS and min(seen) > 0, seen


def test_the_cli_flag_and_environment_reach_the_channel(
    replicas: list[ScriptedServer], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # One CLI run makes one call on a fresh channel, which cannot show a spread: the library tests
    # above show the policy's effect; this shows the flag and the variable become that policy.
    opened: list[str | None] = []

    class Recording(InferenceClient):
        def _open(self) -> None:
            opened.append(self.connection.load_balancing)
            super()._open()

    monkeypatch.setattr(cli, "InferenceClient", Recording)
    target = target_of(replicas)
    assert cli.main(["chat", "hi", "--target", target, "--api-key", "", "--lb", "round_robin"], env={}) == 0
    assert cli.main(["--target", target, "chat", "hi"], env={"INFERENCE_LOAD_BALANCING": "round_robin"}) == 0
    assert cli.main(["chat", "hi", "--target", target], env={}) == 0
    assert opened == ["round_robin", "round_robin", None]
    assert capsys.readouterr().out == "whole\n" * 3 and sum(calls_per_replica(replicas)) == 3

    with pytest.raises(SystemExit) as exit_info:  # argparse's usage error
        cli.main(["chat", "hi", "--lb", "random"], env={})
    assert exit_info.value.code == 2 and "invalid choice: 'random'" in capsys.readouterr().err
    assert cli.main(["chat", "hi", "--target", target], env={"INFERENCE_LOAD_BALANCING": "random"}) == 2
    assert "unknown load-balancing policy 'random' (from INFERENCE_LOAD_BALANCING)" in capsys.readouterr().err


def test_the_channel_gets_grpcs_service_config() -> None:
    options = dict(resolve_connection("dns:///gw:50051", load_balancing="round_robin", env={}).options)
    assert json.loads(options["grpc.service_config"]) == {"loadBalancingConfig": [{"round_robin": {}}]}
    assert resolve_connection("gw:50051", env={}).options == []  # gRPC's default, nothing set
    # A flag or argument wins over the environment.
    env = {"INFERENCE_LOAD_BALANCING": "round_robin"}
    assert resolve_connection("gw:50051", load_balancing="pick_first", env=env).load_balancing == "pick_first"


def test_an_unknown_policy_is_a_configuration_error_naming_its_source() -> None:
    with pytest.raises(ClientConfigError, match=r"'roundrobin' \(from INFERENCE_LOAD_BALANCING\).*round_robin"):
        resolve_connection("gw:50051", env={"INFERENCE_LOAD_BALANCING": "roundrobin"})
    with pytest.raises(ClientConfigError, match=r"\(from --lb / load_balancing\)"):
        InferenceClient("gw:50051", load_balancing="least_request", env={})
