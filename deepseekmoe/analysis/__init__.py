"""Looking inside routing and comparing models: routing statistics (stats), the paper's expert-specialization
experiments (specialization), `deepseekmoe analyze` (analyze), plots (plots, matplotlib), model comparison suites
(compare) and the HTML report (report). Plotting modules import matplotlib only when used."""
