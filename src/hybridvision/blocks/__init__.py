"""hybridvision.blocks"""
