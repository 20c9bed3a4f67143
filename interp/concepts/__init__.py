"""Concepts in activations: collection over data sets, layer-wise probes, concept data sets,
concept vectors, steering and the refusal direction.

One import per line, so that modules can be added independently.
"""

from interp.concepts.collect import Activations, ActivationsMismatchError, collect, tokenize
from interp.concepts.datasets import ConceptDataset, DatasetError, add_noise, load_dataset, load_table
from interp.concepts.probes import Depth, DepthRange, ProbeResults, decodable_depth, depth_range, layer_probes
from interp.concepts.refusal import RefusalDirection, find_refusal_direction, refusal_rate, refusal_scores  # noqa: E501
from interp.concepts.vectors import (  # noqa: E501
    cosine_matrix,
    diff_of_means,
    generate_with,
    inject,
    orthogonalise_weights,
    pca_of_differences,
    probe_direction,
)
