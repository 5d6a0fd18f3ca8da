"""Multi-turn agent runs: environments, losses over sampled tokens only (tool and environment
turns are context, never targets), and the agent trainer; filled in by the agent work.
`toy_task.py`: "a*b+c?" with a calculator tool, learned by a tiny policy on a CPU in minutes.
"""
