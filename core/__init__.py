"""The pure core: domain types and rules with no transport, storage or network inside.

Rollout planning, gate judgement, agreement and latency maths, bundle manifests and the
agent's update transitions live here; the controller and the agent adapt IO to them.
"""
