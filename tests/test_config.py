"""Config loading: both layouts, env overrides, and one clear error per kind of mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from anorag_integrations import ConfigError, Router, load_config

FLAT = {
    "llm": {
        "provider": "vllm_openai",
        "routes": {
            "gpt20_a": {"base_url": "http://10.0.0.1:8000/v1", "model": "openai/gpt-oss-20b"},
            "gpt20_b": {"base_url": "http://10.0.0.2:8000/v1/", "model": "openai/gpt-oss-20b", "weight": 2},
        },
        "default_route": "gpt20_a",
        "lb_policy": "least_latency",
        "params": {"temperature": 0.2, "max_tokens": 256, "timeout": 20, "max_retries": 1},
        "ollama": {"base_url": "http://localhost:11434"},
    }
}


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def nested(data: dict) -> dict:
    llm = dict(data["llm"])
    provider, ollama = llm.pop("provider"), llm.pop("ollama")
    return {"llm": {"provider": provider, "ollama": ollama, "vllm_openai": llm}}


@pytest.mark.parametrize("layout", [FLAT, nested(FLAT)], ids=["flat", "nested"])
def test_both_layouts_load_the_same(tmp_path: Path, layout: dict) -> None:
    config = load_config(write(tmp_path, layout), env={})
    assert list(config.routes) == ["gpt20_a", "gpt20_b"]
    assert config.routes["gpt20_b"].base_url == "http://10.0.0.2:8000/v1"  # trailing slash dropped
    assert config.routes["gpt20_b"].weight == 2
    assert config.routes["gpt20_a"].api_key.get_secret_value() == "EMPTY"
    assert config.lb_policy == "least_latency"
    assert config.params.max_tokens == 256 and config.params.max_retries == 1
    assert config.default_route_name == "gpt20_a"


def test_env_overrides_apply_to_the_default_route(tmp_path: Path) -> None:
    env = {"VLLM_BASE_URL": "http://gpu7:9000/v1", "VLLM_MODEL": "qwen3", "VLLM_API_KEY": "sk-secret-123"}
    config = load_config(write(tmp_path, FLAT), env=env)
    route = config.routes["gpt20_a"]
    assert (route.base_url, route.model, route.api_key.get_secret_value()) == (
        "http://gpu7:9000/v1",
        "qwen3",
        "sk-secret-123",
    )
    assert config.routes["gpt20_b"].base_url == "http://10.0.0.2:8000/v1"


def test_anorag_config_env_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, FLAT)
    monkeypatch.chdir(tmp_path.parent)
    assert load_config(env={"ANORAG_CONFIG": str(path)}).source == str(path)


def test_env_alone_defines_a_single_route(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no config.yaml here
    config = load_config(env={"VLLM_BASE_URL": "http://gpu1:8000/v1", "VLLM_MODEL": "llama"})
    assert {n: (r.base_url, r.model) for n, r in config.routes.items()} == {"default": ("http://gpu1:8000/v1", "llama")}


def test_secrets_stay_out_of_reprs_and_dumps(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FLAT), env={"VLLM_API_KEY": "sk-secret-123"})
    router = Router(config, start_prober=False)
    try:
        for text in (repr(config), str(config), config.model_dump_json(), repr(router), repr(router.routes["gpt20_a"])):
            assert "sk-secret-123" not in text
    finally:
        router.close()


def with_route(**changes: object) -> dict:
    data = yaml.safe_load(yaml.safe_dump(FLAT))
    data["llm"]["routes"]["gpt20_a"].update(changes)
    return data


def with_llm(**changes: object) -> dict:
    data = yaml.safe_load(yaml.safe_dump(FLAT))
    data["llm"].update(changes)
    return data


def without_base_url() -> dict:
    data = yaml.safe_load(yaml.safe_dump(FLAT))
    del data["llm"]["routes"]["gpt20_a"]["base_url"]
    return data


BAD = {
    "unknown lb_policy": (with_llm(lb_policy="fastest"), "llm.lb_policy", "unknown lb_policy 'fastest'"),
    "default_route not a route": (with_llm(default_route="gpt99"), "llm.default_route", "'gpt99' is not among"),
    "fallback_route not a route": (with_llm(fallback_route="cloud"), "llm.fallback_route", "'cloud' is not among"),
    "missing base_url": (without_base_url(), "llm.routes.gpt20_a.base_url", "missing (required)"),
    "not a URL": (with_route(base_url="gpu1:8000"), "llm.routes.gpt20_a.base_url", "not an http(s) URL"),
    "bad port": (with_route(base_url="http://gpu1:99999/v1"), "llm.routes.gpt20_a.base_url", "bad port"),
    "negative timeout": (with_route(timeout=-5), "llm.routes.gpt20_a.timeout", "greater than 0"),
    "zero weight": (with_route(weight=0), "llm.routes.gpt20_a.weight", "greater than 0"),
    "typo in a route key": (with_route(base_ur="http://x/v1"), "llm.routes.gpt20_a.base_ur", "unknown key"),
    "empty routes": (with_llm(routes={}), "llm.routes", "no routes defined"),
    "negative max_retries": (with_llm(params={"max_retries": -1}), "llm.params.max_retries", "greater than or equal"),
    "temperature out of range": (with_llm(params={"temperature": 7}), "llm.params.temperature", "less than or equal"),
    "zero failure_threshold": (with_llm(health={"failure_threshold": 0}), "llm.health.failure_threshold", "greater"),
    "unknown llm key": (with_llm(lb_polcy="round_robin"), "llm.lb_polcy", "unknown key"),
    "routes not a mapping": (with_llm(routes=["a"]), "llm.routes", "valid dictionary"),
    "no llm section": ({"embeddings": {}}, "llm", "missing"),
    "router key beside vllm_openai": (
        {"llm": {"vllm_openai": nested(FLAT)["llm"]["vllm_openai"], "lb_policy": "round_robin"}},
        "llm.lb_policy",
        "belongs under llm.vllm_openai",
    ),
}


@pytest.mark.parametrize(("data", "key", "message"), BAD.values(), ids=BAD.keys())
def test_bad_config_names_file_and_key(tmp_path: Path, data: dict, key: str, message: str) -> None:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    text = str(info.value)
    assert f"{path}: {key}" in text, text
    assert message in text, text


def test_nested_layout_errors_use_the_nested_key_path(tmp_path: Path) -> None:
    data = nested(with_route(timeout=-1))
    path = write(tmp_path, data)
    with pytest.raises(ConfigError, match=r"llm\.vllm_openai\.routes\.gpt20_a\.timeout"):
        load_config(path, env={})


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    data = with_route(timeout=-1, weight=-1)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, data), env={})
    assert {key for key, _ in info.value.problems} == {"llm.routes.gpt20_a.timeout", "llm.routes.gpt20_a.weight"}


def test_bad_env_override_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"base_url \(from \$VLLM_BASE_URL\): not an http\(s\) URL"):
        load_config(write(tmp_path, FLAT), env={"VLLM_BASE_URL": "gpu7"})


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "llm:\n  routes: {a: [\n")
    with pytest.raises(ConfigError, match=r"line \d+, column \d+: not valid YAML"):
        load_config(path, env={})


def test_missing_file_says_how_to_point_at_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"config file not found; pass a path, set \$ANORAG_CONFIG"):
        load_config(env={})
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found$"):
        load_config(tmp_path / "nope.yaml", env={})


def test_api_key_is_never_echoed_in_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, with_route(api_key=["sk-secret-123"])), env={})
    assert "llm.routes.gpt20_a.api_key" in str(info.value)
    assert "sk-secret-123" not in str(info.value)


def test_the_shipped_config_is_valid() -> None:
    config = load_config(Path(__file__).parent.parent / "config.yaml", env={})
    assert len(config.routes) == 2


@pytest.mark.parametrize("layout", [FLAT, nested(FLAT)], ids=["flat", "nested"])
def test_every_problem_in_a_file_is_reported_together_with_did_you_mean(tmp_path: Path, layout: dict) -> None:
    data = yaml.safe_load(yaml.safe_dump(layout))
    section = data["llm"].get("vllm_openai", data["llm"])
    prefix = "llm.vllm_openai" if "vllm_openai" in data["llm"] else "llm"
    section["lb_polcy"] = section.pop("lb_policy")
    section["routes"]["gpt20_a"]["bsae_url"] = section["routes"]["gpt20_a"].pop("base_url")
    section["params"]["temprature"] = 0.3
    section["health"] = {"failure_treshold": 2, "cooldown": -1}
    section["params"]["max_tokens"] = 0
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, data), env={})
    assert dict(info.value.problems) == {
        f"{prefix}.lb_polcy": "unknown key; did you mean 'lb_policy'?",
        f"{prefix}.routes.gpt20_a.bsae_url": "unknown key; did you mean 'base_url'?",
        f"{prefix}.routes.gpt20_a.base_url": "missing (required)",
        f"{prefix}.params.temprature": "unknown key; did you mean 'temperature'?",
        f"{prefix}.params.max_tokens": "Input should be greater than 0 (got 0)",
        f"{prefix}.health.failure_treshold": "unknown key; did you mean 'failure_threshold'?",
        f"{prefix}.health.cooldown": "Input should be greater than or equal to 0 (got -1)",
    }


def test_an_unknown_key_with_no_likely_meaning_lists_the_keys_there(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, with_route(colour="blue")), env={})
    [(key, message)] = info.value.problems
    assert key == "llm.routes.gpt20_a.colour" and message.startswith("unknown key; expected one of aliases, api, ")


def test_keys_beside_the_nested_section_do_not_hide_its_own_problems(tmp_path: Path) -> None:
    data = nested(with_route(timeout=-1))
    data["llm"]["lb_policy"] = "round_robin"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, data), env={})
    assert [key for key, _ in info.value.problems] == ["llm.lb_policy", "llm.vllm_openai.routes.gpt20_a.timeout"]


def test_router_from_config_takes_a_parsed_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from anorag_integrations import config_from_dict

    for variable in ("VLLM_BASE_URL", "VLLM_MODEL", "VLLM_API_KEY"):  # a dict takes them as a file does
        monkeypatch.delenv(variable, raising=False)
    router = Router.from_config(FLAT, start_prober=False)
    try:
        assert list(router.routes) == ["gpt20_a", "gpt20_b"] and router.config.source == "<dict>"
        again = Router.from_config(router.config, start_prober=False)  # a Config as it is
        assert again.config is router.config
        again.close()
    finally:
        router.close()
    assert config_from_dict(FLAT, env={}).lb_policy == "least_latency"
    with pytest.raises(ConfigError, match=r"<dict>: llm\.lb_polcy: unknown key; did you mean 'lb_policy'\?"):
        Router.from_config(with_llm(lb_polcy="round_robin"))
