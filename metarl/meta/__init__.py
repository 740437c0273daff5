"""Meta-learning methods: how a learned algorithm is found."""
