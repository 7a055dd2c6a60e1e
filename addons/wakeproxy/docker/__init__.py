"""The Docker side: the one listing plus the event stream (`view`), and the calls that change
containers (`ops`). Only the controller side uses it; it imports `routing` (to build snapshots),
never the request path. Every blocking SDK call runs in a thread of its own."""
