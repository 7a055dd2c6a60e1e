"""ACME (Let's Encrypt) certificates: which names, orders (HTTP-01, TLS-ALPN-01), storage, renewal.

Names: every non-wildcard host of a container labelled `wakeproxy.acme=true`,
and the names in a container's `LETSENCRYPT_HOST` environment variable
(acme-companion's convention).  Stopped containers count, so a sleeping
sandbox has its certificate before anyone wakes it.  Names are ordered as soon
as a snapshot shows them — not on the first handshake, which would fail.

Challenges: HTTP-01, answered by the proxy itself on the HTTP listener for any
host before routing (nothing is woken).  When `listen.http` is off, TLS-ALPN-01
(RFC 8737) on the HTTPS listener instead: a handshake offering only
`acme-tls/1` for a name with a pending challenge gets the challenge
certificate.  (TLS-ALPN-01 needs the acme library's `TLSALPN01` class: acme
3.x has it, acme 5.x does not.)

One certificate per name.  Everything that blocks (the `acme` library, key
generation, disk) runs in threads; the event loop only schedules, and the
request path only reads a dict (`ChallengeTokens`) and mitmproxy's store.

Renewal: when a third of the lifetime is left, or earlier inside the window
the CA's ARI (`renewalInfo`) suggests.  A failed attempt is logged once with
the CA's problem detail, keeps the old certificate in service, and is retried
with exponential backoff and jitter (1 min → 6 h).  Within one attempt,
`badNonce` is retried at once and 429/5xx after the CA's `Retry-After`
(RFC 8555 §6.5, §6.6); a longer `Retry-After` ends the attempt and sets the
next one.

Storage, under `state_dir/acme/`:

    account.key                         the account's EC P-256 key (0600), created once
    certs/<name>/<serial>/privkey.pem   the certificate's key (0600)
    certs/<name>/<serial>/fullchain.pem leaf + intermediates
    certs/<name>/<serial>/combined.pem  key + chain (0600): the file mitmproxy serves
    certs/<name>/live -> <serial>       switched atomically once all three are written

A restart loads `live` for every name and orders nothing that is still good.

Test-only knob (documented here and in the README, not in the config): the
environment variable `WAKEPROXY_ACME_TEST_BACKOFF` (seconds) replaces the
1-minute first backoff step, so a test can watch a failure and the recovery.
"""
