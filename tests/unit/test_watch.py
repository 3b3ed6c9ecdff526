from core.settings import WatchSpec
from flows.watch import VersionStats, breach, delta, parse, quantile, stats

METRICS = """# HELP valifi_http_requests_total POST /predict requests answered
# TYPE valifi_http_requests_total counter
valifi_http_requests_total{model_version="1",status="200",type="execution"} 90.0
valifi_http_requests_total{model_version="2",status="200",type="execution"} 40.0
valifi_http_requests_total{model_version="2",status="500",type="error"} 10.0
valifi_http_requests_total{model_version="none",status="422",type="invalid"} 7.0
valifi_request_latency_seconds_bucket{le="0.01",model_version="1",type="execution"} 80.0
valifi_request_latency_seconds_bucket{le="0.05",model_version="1",type="execution"} 89.0
valifi_request_latency_seconds_bucket{le="0.1",model_version="1",type="execution"} 90.0
valifi_request_latency_seconds_bucket{le="+Inf",model_version="1",type="execution"} 90.0
valifi_request_latency_seconds_bucket{le="0.01",model_version="2",type="execution"} 10.0
valifi_request_latency_seconds_bucket{le="0.05",model_version="2",type="execution"} 30.0
valifi_request_latency_seconds_bucket{le="0.1",model_version="2",type="execution"} 49.0
valifi_request_latency_seconds_bucket{le="+Inf",model_version="2",type="execution"} 50.0
"""


def test_stats_per_version():
    s = stats(parse(METRICS), "2")
    assert (s.requests, s.errors) == (50.0, 10.0)
    assert s.error_rate == 0.2
    assert s.buckets[float("inf")] == 50.0
    assert stats(parse(METRICS), "1").error_rate == 0.0


def test_quantile_is_the_bucket_bound():
    assert quantile({0.01: 80, 0.05: 89, 0.1: 90, float("inf"): 90}, 0.99) == 0.1
    assert quantile({0.01: 80, 0.05: 89, 0.1: 90, float("inf"): 90}, 0.5) == 0.01
    assert quantile({}, 0.99) is None
    assert quantile({0.1: 0, float("inf"): 0}, 0.99) is None


def test_delta_counts_only_the_window():
    before = VersionStats(10, 1, {0.1: 10, float("inf"): 10})
    now = VersionStats(30, 1, {0.1: 25, float("inf"): 30})
    d = delta(now, before)
    assert (d.requests, d.errors, d.buckets) == (20, 0, {0.1: 15, float("inf"): 20})


def test_judge_error_rate_latency_and_too_few_requests():
    spec = WatchSpec(max_error_rate=0.05, max_p99_ratio=2.0, min_p99_s=0.05, min_requests=20)
    bad = stats(parse(METRICS), "2")
    assert "error rate 20.0%" in breach(spec, bad, 0.1)
    few = VersionStats(5, 5, {})
    assert breach(spec, few, None) is None
    slow = VersionStats(100, 0, {0.05: 10, 0.5: 100, float("inf"): 100})
    assert "p99 latency 500 ms" in breach(spec, slow, 0.1)
    assert breach(spec, slow, 0.3) is None  # within 2x of the previous version
    fast = VersionStats(100, 0, {0.01: 100, float("inf"): 100})
    assert breach(spec, fast, 0.001) is None  # under the floor: never a breach


def test_a_5xx_no_worker_labelled_counts_against_the_watched_version():
    text = (
        'valifi_http_requests_total{model_version="2",status="200",type="execution"} 30.0\n'
        'valifi_http_requests_total{model_version="none",status="504",type="error"} 5.0\n'
        'valifi_http_requests_total{model_version="none",status="422",type="invalid"} 9.0\n'
    )
    s = stats(parse(text), "2")
    assert (s.requests, s.errors) == (35.0, 5.0)
