"""wakeproxy benchmarks: wakeproxy against its peers and its limits, measured in one run.

Run through `scripts/bench` (`python -m wpbench` with scripts/ on the path) (which installs wrk, h2load, nginx-light and the venv with the `bench`
extra). Everything listens on 127.0.0.1; containers live on a bridge network this run creates (or use
the host network), and every address is checked to be on a local bridge before it is contacted.
Every process, container, network and image is removed on exit, also on failure or Ctrl-C.

Sections:
  throughput   requests/s and latency (p50, p99): HTTP/1.1 keep-alive (wrk) and HTTP/2 over TLS
               (h2load), 100 B and 100 KB responses; direct nginx, nginx as a reverse proxy, stock
               mitmdump with a bare routing script, stock `mitmdump -s addons/wakeproxy.py`, `wakeproxy`
  wake         time to first byte for a sleeping container vs raw `docker start` + first connect,
               and 200 concurrent requests arriving during one wake
  convergence  container `start` → first 200 through the proxy for its host
  scale        1,000 labelled containers: resync time, memory, lookup cost, req/s vs 1 host
  soak         wrk for 60 s at 64 connections: errors and memory at start, middle, end
"""

