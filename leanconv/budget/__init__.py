"""Budget solver: per-layer methods that meet a MAC budget with the least calibration error, handed to
``convert`` as ready per-layer choices (see ``solver``); the multiple-choice knapsack it solves (``knapsack``)."""
from leanconv.budget.knapsack import multiple_choice_knapsack
from leanconv.budget.solver import (BudgetConfig, BudgetSolution, Candidate, Candidates, LayerBudget, Weighting,
                                    check_budget, choose, default_menu, measure_candidates, size_candidates,
                                    solve_budget)

__all__ = ["BudgetConfig", "BudgetSolution", "Candidate", "Candidates", "LayerBudget", "Weighting", "check_budget",
           "choose", "default_menu", "measure_candidates", "multiple_choice_knapsack", "size_candidates",
           "solve_budget"]
