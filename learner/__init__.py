"""Online learning: the durable event buffer, the learner actor and the weight push to routers.

Built in the online-learning issue on top of the policy contract in `banditrouter.policies`; empty until then.
"""
