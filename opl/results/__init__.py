"""Result records of finished runs, the statistics over seeds, and the paper's tables and figures."""
