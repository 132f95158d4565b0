"""Metrics carry vLLM's names under `rlx:`; the engine's gauges are read at scrape time."""

from __future__ import annotations

import json
import logging

from prometheus_client.parser import text_string_to_metric_families

from rlx.serve.metrics import Metrics, RequestClock, access_log


def _samples(metrics: Metrics) -> dict[str, float]:
    text = metrics.render().decode()
    return {s.name + (json.dumps(s.labels, sort_keys=True) if s.labels else ""): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_names_and_values() -> None:
    state = {"num_requests_running": 0, "num_requests_waiting": 0}
    metrics = Metrics(lambda: {**state, "kv_cache_usage_perc": 0.25, "prefix_cache_queries": 32,
                               "prefix_cache_hits": 16})
    state["num_requests_running"] = 3  # read when scraped, not when registered
    clock = RequestClock(metrics)
    clock.token(queued_s=0.25)  # the engine's queue time rides on the first token
    for _ in range(3):
        clock.token()
    clock.finish("length")
    metrics.prompt_tokens.inc(7)
    s = _samples(metrics)
    assert s["rlx:num_requests_running"] == 3 and s["rlx:num_requests_waiting"] == 0
    assert s["rlx:kv_cache_usage_perc"] == 0.25
    assert s["rlx:prefix_cache_queries_total"] == 32 and s["rlx:prefix_cache_hits_total"] == 16
    assert s["rlx:prompt_tokens_total"] == 7 and s["rlx:generation_tokens_total"] == 4
    assert s["rlx:time_to_first_token_seconds_count"] == 1 and s["rlx:inter_token_latency_seconds_count"] == 3
    assert s["rlx:e2e_request_latency_seconds_count"] == 1
    assert s['rlx:request_success_total{"finished_reason": "length"}'] == 1
    assert s["rlx:request_queue_time_seconds_count"] == 1 and s["rlx:request_queue_time_seconds_sum"] == 0.25
    assert not any(name.endswith("_created") for name in s)


def test_engine_metrics_absent_until_loaded() -> None:
    s = _samples(Metrics(dict))
    assert "rlx:num_requests_running" not in s and "rlx:prompt_tokens_total" in s


def test_access_log_is_one_json_line(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="rlx.serve.access"):
        access_log(method="POST", path="/v1/completions", status=200, ms=1.5, request_id=None)
    (record,) = caplog.records
    assert json.loads(record.getMessage()) == {"method": "POST", "path": "/v1/completions", "status": 200, "ms": 1.5}
