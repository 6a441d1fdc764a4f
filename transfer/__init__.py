"""transfer: fine-tuning compressed models on CUB-200-2011 (Table 5). Not built yet; see the
transfer issue."""
