"""OpenTelemetry SDK set-up for applications that have none (extra ``otel``).

The one module that imports the OpenTelemetry SDK and exporters. A library never sets
global providers on its own, so nothing here runs unless the application (or the
``pipekit`` command, which owns its process) calls :func:`configure`::

    from pipekit import otel_setup
    otel_setup.configure(service_name="transactions")    # Prometheus via the ops server
    otel_setup.configure(otlp_endpoint="http://collector:4318")   # and OTLP too

It honours the standard variables: ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_EXPORTER_OTLP_ENDPOINT`` (turns OTLP export on), ``OTEL_TRACES_SAMPLER`` and
``OTEL_TRACES_SAMPLER_ARG`` (default here: parent-based, 1 % of new traces).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from pipekit.errors import ConfigError, missing_extra

__all__ = ["DURATION_BUCKETS", "OtelSetup", "configure", "current", "render_metrics"]

log = logging.getLogger("pipekit.otel_setup")

#: Bucket bounds (seconds) for pipekit's duration histograms: 100 µs to 30 s.
DURATION_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
)

_lock = threading.Lock()
_current: OtelSetup | None = None


@dataclass(slots=True)
class OtelSetup:
    """What :func:`configure` installed.

    Attributes:
        tracer_provider: the SDK tracer provider (or the application's, if it had one).
        meter_provider: the SDK meter provider (or the application's).
        installed: False when the application already had providers and nothing was set.
        otlp_endpoint: where OTLP export goes, or None.
    """

    tracer_provider: Any
    meter_provider: Any
    installed: bool
    otlp_endpoint: str | None = None
    _registry: Any = field(default=None, repr=False)

    def render(self, openmetrics: bool = False) -> tuple[bytes, str]:
        """The Prometheus exposition of the metrics (``/metrics``).

        Raises:
            LookupError: this set-up has no Prometheus reader (the application's own
                providers were kept).
        """
        if self._registry is None:
            raise LookupError("no Prometheus reader is installed")
        if openmetrics:
            from prometheus_client.openmetrics import exposition as om

            body: bytes = om.generate_latest(self._registry)  # type: ignore[no-untyped-call]
            return body, om.CONTENT_TYPE_LATEST
        from prometheus_client import exposition

        return exposition.generate_latest(self._registry), exposition.CONTENT_TYPE_LATEST

    def shutdown(self) -> None:
        """Flush and stop the providers this set-up installed."""
        global _current
        if not self.installed:
            return
        for p in (self.tracer_provider, self.meter_provider):
            try:
                p.shutdown()
            except Exception:  # exporters never break the application's exit
                log.debug("provider shutdown failed", exc_info=True)
        with _lock:
            if _current is self:
                _current = None


def _sdk() -> tuple[Any, Any]:
    try:
        from opentelemetry.sdk import metrics as sdk_metrics
        from opentelemetry.sdk import trace as sdk_trace
    except ImportError as err:
        raise missing_extra("OpenTelemetry set-up", "otel", "opentelemetry-sdk", err) from err
    return sdk_trace, sdk_metrics


def _has_providers() -> bool:
    from opentelemetry import metrics, trace

    tp = trace.get_tracer_provider()
    mp = metrics.get_meter_provider()
    proxy_t = type(tp).__name__ in ("ProxyTracerProvider", "NoOpTracerProvider")
    proxy_m = type(mp).__name__ in ("_ProxyMeterProvider", "NoOpMeterProvider")
    return not (proxy_t and proxy_m)


def _sampler(sdk_trace: Any) -> Any:
    from opentelemetry.sdk.trace import sampling

    if os.environ.get("OTEL_TRACES_SAMPLER"):
        return None  # the SDK reads the variables itself
    return sampling.ParentBased(sampling.TraceIdRatioBased(0.01))


def configure(*, service_name: str | None = None, prometheus: bool = True,
              otlp_endpoint: str | None = None, sample_ratio: float | None = None,
              set_global: bool = True, metric_export_interval: float = 10.0) -> OtelSetup:
    """Install an SDK tracer and meter provider, unless the application has its own.

    Args:
        service_name: the ``service.name`` resource attribute (``OTEL_SERVICE_NAME``
            wins when set).
        prometheus: keep a Prometheus reader, served by the ops server's ``/metrics``.
        otlp_endpoint: OTLP/HTTP endpoint for traces and metrics
            (``OTEL_EXPORTER_OTLP_ENDPOINT`` when None; no OTLP when neither is set).
        sample_ratio: share of new traces sampled (parent-based); default 1 %, or what
            ``OTEL_TRACES_SAMPLER`` says.
        set_global: install the providers as the global ones.
        metric_export_interval: seconds between OTLP metric exports.

    Returns:
        The set-up; ``installed`` is False when providers already existed (then
        nothing is changed and a warning is logged).

    Raises:
        MissingExtraError: the ``otel`` extra is not installed.
        ConfigError: a bad ratio or interval.
    """
    global _current
    if sample_ratio is not None and not 0.0 <= sample_ratio <= 1.0:
        raise ConfigError(f"sample_ratio must be between 0 and 1 (got {sample_ratio!r})")
    if metric_export_interval <= 0:
        raise ConfigError(f"metric_export_interval must be > 0 seconds "
                          f"(got {metric_export_interval!r})")
    sdk_trace, sdk_metrics = _sdk()
    from opentelemetry import metrics, trace

    with _lock:
        if _current is not None:
            return _current
        if set_global and _has_providers():
            log.warning("OpenTelemetry providers are already installed; pipekit keeps them "
                        "and installs nothing (pass them to Pipeline(tracer_provider=..., "
                        "meter_provider=...) or leave the globals in place)")
            return OtelSetup(trace.get_tracer_provider(), metrics.get_meter_provider(),
                             installed=False)
        from opentelemetry.sdk.resources import Resource

        attrs = {"service.name": os.environ.get("OTEL_SERVICE_NAME")
                 or service_name or "pipekit"}
        resource = Resource.create(attrs)
        endpoint = otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None
        readers: list[Any] = []
        registry = None
        if prometheus:
            registry = _prometheus_reader(readers)
        if endpoint:
            readers.append(_otlp_metrics(endpoint, metric_export_interval))
        from opentelemetry.sdk.metrics import Histogram
        from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

        views = [View(instrument_name="pipekit.stage.*", instrument_type=Histogram,
                      aggregation=ExplicitBucketHistogramAggregation(DURATION_BUCKETS))]
        mp = sdk_metrics.MeterProvider(metric_readers=readers, resource=resource, views=views)
        sampler = _sampler(sdk_trace)
        if sample_ratio is not None:
            from opentelemetry.sdk.trace import sampling

            sampler = sampling.ParentBased(sampling.TraceIdRatioBased(sample_ratio))
        tp = sdk_trace.TracerProvider(resource=resource, **({"sampler": sampler}
                                                            if sampler else {}))
        if endpoint:
            _otlp_traces(tp, endpoint)
        if set_global:
            trace.set_tracer_provider(tp)
            metrics.set_meter_provider(mp)
        setup = OtelSetup(tp, mp, installed=True, otlp_endpoint=endpoint, _registry=registry)
        _current = setup
        return setup


def _prometheus_reader(readers: list[Any]) -> Any:
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry
    except ImportError as err:
        raise missing_extra("Prometheus metrics", "otel", "opentelemetry-exporter-prometheus",
                            err) from err
    registry = CollectorRegistry(auto_describe=True)
    readers.append(PrometheusMetricReader(registry=registry))
    return registry


def _otlp_metrics(endpoint: str, interval: float) -> Any:
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    except ImportError as err:
        raise missing_extra("OTLP export", "otel", "opentelemetry-exporter-otlp-proto-http",
                            err) from err
    url = endpoint.rstrip("/") + "/v1/metrics"
    return PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=url, timeout=5),
                                         export_interval_millis=interval * 1000)


def _otlp_traces(tp: Any, endpoint: str) -> None:
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as err:
        raise missing_extra("OTLP export", "otel", "opentelemetry-exporter-otlp-proto-http",
                            err) from err
    url = endpoint.rstrip("/") + "/v1/traces"
    # A bounded queue that drops (and counts) when the collector is slow: export never
    # blocks the pipeline.
    tp.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url, timeout=5),
                                             max_queue_size=2048, export_timeout_millis=5000))


def current() -> OtelSetup | None:
    """The set-up :func:`configure` installed, if any."""
    return _current


def render_metrics(openmetrics: bool = False) -> tuple[bytes, str]:
    """Prometheus text from the installed set-up (what ``/metrics`` serves).

    Raises:
        LookupError: :func:`configure` was not called (or kept the application's
            providers, which have no reader pipekit can serve).
    """
    setup = _current
    if setup is None:
        raise LookupError("metrics are not set up; call pipekit.otel_setup.configure()")
    return setup.render(openmetrics)
