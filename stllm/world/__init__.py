"""A synthetic world with ground truth: scenes (objects, motion), their rendering, captions, questions and scoring.

Every clip's content is known, so a caption, an answer or a search hit can be checked against the truth.
`scenes` draws scenes and says what is true of them; `render` draws their frames; `scoring` grades answers.
"""
