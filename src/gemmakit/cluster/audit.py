"""One audit log for all replicas: a Ray actor owns the SQLite file, on the ingress's node.

``gemmakit serve --ray --audit-db FILE`` starts an :class:`AuditWriter` actor pinned to the node of the process that
runs the ingress (the machine where ``gemmakit audit FILE`` is then run) and hands every replica a
:class:`RemoteAuditLog`: the interface the server's app uses (``store_text``, ``record``, ``add_feedback``,
``close``), each call a round trip to the actor. So rows and user reports land in one file whatever replica served
the request, and the single server's promise holds: a request's row is committed before its response's last bytes
leave the replica (the app waits for the actor's answer), and feedback on any replica finds any replica's rows.
"""

from __future__ import annotations

from typing import Any

from ..safety.audit import AuditLog, AuditRecord

CALL_TIMEOUT_S = 30.0  # a write the actor has not confirmed by then fails the request's row (logged by the app)


class AuditWriter:
    """The Ray actor behind the shared audit log (calls run one at a time: SQLite has one writer)."""

    def __init__(self, path: str, store_text: bool, retention_days: float | None) -> None:
        self.log = AuditLog(path, store_text, retention_days)

    def ready(self) -> bool:
        return True

    def record(self, rec: AuditRecord) -> None:
        self.log.record(rec)

    def add_feedback(self, request_id: str, rating: int, category: str | None, comment: str | None) -> int | None:
        return self.log.add_feedback(request_id, rating, category, comment)

    def close(self) -> None:
        self.log.close()


class RemoteAuditLog:
    """What a replica's app holds instead of an :class:`~gemmakit.safety.audit.AuditLog`: the same calls, made on
    the :class:`AuditWriter` actor (picklable: Ray ships it to every replica). The app calls these from worker
    threads, so a blocking wait for the actor is what it expects."""

    def __init__(self, writer: Any, store_text: bool) -> None:
        self.writer, self.store_text = writer, store_text

    def record(self, rec: AuditRecord) -> None:
        import ray

        ray.get(self.writer.record.remote(rec), timeout=CALL_TIMEOUT_S)

    def add_feedback(self, request_id: str, rating: int, category: str | None = None,
                     comment: str | None = None) -> int | None:
        import ray

        return ray.get(self.writer.add_feedback.remote(request_id, rating, category, comment),
                       timeout=CALL_TIMEOUT_S)

    def close(self) -> None:
        """Nothing: the writer belongs to the ingress's process, which closes it (:func:`stop_audit_writer`)."""


def start_audit_writer(path: str, store_text: bool, retention_days: float | None) -> tuple[Any, RemoteAuditLog]:
    """Start the writer on this process's node (Ray must be running; the caller has opened the file once already,
    so that a bad path fails before anything starts) and wait until it has the file open; the actor and the log to
    give the replicas."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    writer = ray.remote(AuditWriter).options(num_cpus=0, scheduling_strategy=here).remote(
        str(path), store_text, retention_days)
    ray.get(writer.ready.remote(), timeout=120)
    return writer, RemoteAuditLog(writer, store_text)


def stop_audit_writer(writer: Any) -> None:
    """Close the file and end the actor."""
    import ray

    try:
        ray.get(writer.close.remote(), timeout=CALL_TIMEOUT_S)
    finally:
        ray.kill(writer)
