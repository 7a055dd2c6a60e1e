"""Certificates: the one chosen per SNI in mitmproxy's store (`store`: ACME > custom > default),
the HTTPS redirect and HSTS (`https`), and ACME orders and renewals (`acme`, split along its
seams: timing, challenges, storage, client, manager). Reads the snapshot's certificate names;
never talks to Docker."""
