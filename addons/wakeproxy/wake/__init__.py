"""Waking and idling: the single-flight wake of a group (`waker`), the per-client wake budget
(`budget`), and the idle keeper that puts unused groups to sleep (`idle`). Containers are
started and stopped only through `docker.ops`; the snapshot is read, never built here."""
