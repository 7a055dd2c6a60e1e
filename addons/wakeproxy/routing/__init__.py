"""Routing: pure values and the request-path addons.

- `hostnames`, `labels`, `traefik_rule`: a container's labels and environment → site
  declarations (pure, linear time, bounded input).
- `policy`: which group may claim which name (ownership, the operator's allow-list).
- `snapshot`: the immutable routing table, O(1) lookup.
- `router`, `hygiene`: the request hooks (strict HTTP in, clean HTTP out; host → backend).

Imports `config` and `observe.logsafe`; never `docker`, `certs` or `mitm`; the pure modules
import no mitmproxy."""
