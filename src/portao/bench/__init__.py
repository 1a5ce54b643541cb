"""`portao bench`: load generator, reference servers and the before/after comparison.

The load generator runs in several processes (uvloop, connections spread over
127.0.0.x source addresses) so that it is not the bottleneck; each scenario
writes JSON and a readable table. `baseline` is the thread-per-client "before"
server and `bare` the plain uvloop echo server that "% of bare uvloop" is taken of.
"""
