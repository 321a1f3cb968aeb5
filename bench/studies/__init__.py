"""One-off studies: experiments that answered a question once (their results are in the docs),
kept runnable and smoke-tested, apart from the benches of the product's figures in bench/."""
