"""The code a saved demo pipeline folder carries (``stepcache demo --save-pipeline``): each module imports only
torch and diffusers, and is copied into the folder as it is, so the folder loads without stepcache."""
