"""Adaptations of mitmproxy's internals, each guarded by a check of exactly what it touches and
falling back with one warning: the lean master's hook dispatch (`dispatch`) and type-check skip
(`lean`), HTTP/2 → HTTP/1.1 connection reuse (`h2reuse`), bounded request heads (`headbound`), our
error pages (`errorpages`), early answers to uploads (`earlyanswer`), upstream connects and
deadlines (`upstream`), connection limits (`limits`) and the graceful stop (`shutdown`)."""
